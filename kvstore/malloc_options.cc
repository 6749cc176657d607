#include "kvstore/malloc_options.h"

#include <malloc.h>

namespace kvcache::kvstore {

void KeepLargeBlocksForReuse() {
  mallopt(M_MMAP_THRESHOLD, 32 << 20);  // the largest glibc accepts
  mallopt(M_TRIM_THRESHOLD, 256 << 20);
}

}  // namespace kvcache::kvstore
