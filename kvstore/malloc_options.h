// Process-wide allocator settings for kvcached's data path.
#ifndef KVCACHE_KVSTORE_MALLOC_OPTIONS_H_
#define KVCACHE_KVSTORE_MALLOC_OPTIONS_H_

namespace kvcache::kvstore {

// Chunks, and the buffers that carry them in and out (NVMe read buffers,
// gRPC messages), are megabytes each and are allocated and freed all the
// time. By default glibc hands such blocks back to the kernel on free (as
// mmap'd blocks, or by trimming the heap), so each reuse faults every 4 KiB
// page in again, which costs more than copying the bytes (several times more
// in a VM). This keeps blocks of up to 32 MiB, and up to 256 MiB of free
// heap, for reuse instead. Process-wide; call it at start-up.
void KeepLargeBlocksForReuse();

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_MALLOC_OPTIONS_H_
