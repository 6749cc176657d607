// The forward pass's elementwise functions, built with -ffast-math so that
// their exponentials vectorize: at an 8K-token context, attention's softmax
// takes billions of them, three times faster so. Results may differ from
// std::exp's in the last bits; the same inputs always give the same bits.
#ifndef KVCACHE_CLIENT_EXAMPLES_CHAT_ACTIVATIONS_H_
#define KVCACHE_CLIENT_EXAMPLES_CHAT_ACTIVATIONS_H_

#include <cstddef>

namespace kvcache::chat {

// x[0, n) = softmax(x[0, n)); n > 0.
void Softmax(float* x, int n);

// gate[i] = silu(gate[i]) * up[i] for i in [0, n): SwiGLU's product.
void SwiGlu(float* gate, const float* up, size_t n);

}  // namespace kvcache::chat

#endif  // KVCACHE_CLIENT_EXAMPLES_CHAT_ACTIVATIONS_H_
