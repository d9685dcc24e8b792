// The RocksDB file objects on BlobFS, and the conversions they share with
// the FileSystem (cpp/blobfs_fs.cc, this header's one includer): each
// object wraps one Rust handle from rocksdb-env/src/bridge.rs and forwards
// every call to it; no file-system logic lives here.
//
// Invariants:
// - A file object exists only for a file BlobFS opened; its Rust handle is
//   closed exactly once (Close, or the destructor if RocksDB skipped Close).
// - No slice is ever built from a null pointer (ReadAt refuses a null
//   scratch buffer with InvalidArgument).
// - A read's time limit (IOOptions::timeout) spans all the device reads it
//   takes (ReadLimit).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <sys/mman.h>
#include <unistd.h>
#include <vector>

#include "rocksdb-env/src/bridge.rs.h"
#include "rocksdb/file_system.h"
#include "rocksdb/io_status.h"

namespace blobfs_rocksdb {
namespace files {

using ROCKSDB_NAMESPACE::FileLock;
using ROCKSDB_NAMESPACE::FileOptions;
using ROCKSDB_NAMESPACE::FSDirectory;
using ROCKSDB_NAMESPACE::FSRandomAccessFile;
using ROCKSDB_NAMESPACE::FSRandomRWFile;
using ROCKSDB_NAMESPACE::FSReadRequest;
using ROCKSDB_NAMESPACE::FSSequentialFile;
using ROCKSDB_NAMESPACE::FSWritableFile;
using ROCKSDB_NAMESPACE::IODebugContext;
using ROCKSDB_NAMESPACE::IOHandleDeleter;
using ROCKSDB_NAMESPACE::IOOptions;
using ROCKSDB_NAMESPACE::IOStatus;
using ROCKSDB_NAMESPACE::Slice;

inline IOStatus ToIOStatus(const Status& s) {
  if (s.code == Code::Ok) {
    return IOStatus::OK();
  }
  const std::string msg(s.message.data(), s.message.size());
  switch (s.code) {
    case Code::NotFound:
      return IOStatus::NotFound(msg);
    case Code::NoSpace:
      return IOStatus::NoSpace(msg);
    case Code::Corruption:
      return IOStatus::Corruption(msg);
    case Code::NotSupported:
      return IOStatus::NotSupported(msg);
    case Code::InvalidArgument:
      return IOStatus::InvalidArgument(msg);
    case Code::Busy:
      return IOStatus::Busy(msg);
    case Code::TimedOut:
      return IOStatus::TimedOut(msg);
    default:
      return IOStatus::IOError(msg);
  }
}

inline rust::Str Str(const std::string& s) { return rust::Str(s.data(), s.size()); }

// A path as POSIX resolves it: a run of `/` is one separator (DBTestBase's
// names start with `/`, so its paths hold `//`), and a trailing `/` names
// the same entry. BlobFS itself accepts only single separators.
inline std::string PosixPath(const std::string& p) {
  std::string out;
  out.reserve(p.size());
  for (char c : p) {
    if (c == '/' && !out.empty() && out.back() == '/') continue;
    out.push_back(c);
  }
  if (out.size() > 1 && out.back() == '/') out.pop_back();
  return out;
}

inline rust::Slice<std::uint8_t> Out(char* p, size_t n) {
  return rust::Slice<std::uint8_t>(reinterpret_cast<std::uint8_t*>(p), n);
}

inline rust::Slice<const std::uint8_t> In(const Slice& s) {
  return rust::Slice<const std::uint8_t>(
      reinterpret_cast<const std::uint8_t*>(s.data()), s.size());
}

// A read's time limit (IOOptions::timeout, from ReadOptions::io_timeout or
// deadline; 0 for none) across the device reads it takes: each gets what is
// left of it, and one that starts with nothing left times out at once.
class ReadLimit {
 public:
  explicit ReadLimit(const IOOptions& opts)
      : us_(std::max<int64_t>(0, static_cast<int64_t>(opts.timeout.count()))),
        start_(std::chrono::steady_clock::now()) {}
  // The time limit for the next device read: `*timeout_us` is what is left
  // (0 for no limit), or TimedOut when nothing is left.
  IOStatus Next(uint64_t* timeout_us) const {
    *timeout_us = 0;
    if (us_ == 0) return IOStatus::OK();
    const int64_t spent =
        std::chrono::duration_cast<std::chrono::microseconds>(
            std::chrono::steady_clock::now() - start_)
            .count();
    if (spent >= us_) {
      return IOStatus::TimedOut("read not started: its " +
                                std::to_string(us_) +
                                " us time limit had passed");
    }
    *timeout_us = static_cast<uint64_t>(us_ - std::max<int64_t>(0, spent));
    return IOStatus::OK();
  }

 private:
  const int64_t us_;
  const std::chrono::steady_clock::time_point start_;
};

// Reads [offset, offset + n) into scratch; *result is the bytes read. A
// null scratch (what RocksDB passes to a file opened for mmap reads) is
// refused: no slice is ever built from a null pointer.
inline IOStatus ReadAt(const FileHandle& h, uint64_t offset, size_t n, Slice* result,
                char* scratch, const ReadLimit& limit) {
  if (scratch == nullptr && n > 0) {
    *result = Slice();
    return IOStatus::InvalidArgument(
        "read into a null buffer (only files opened with use_mmap_reads "
        "take one)");
  }
  size_t got = 0;
  uint64_t timeout_us = 0;
  IOStatus left = limit.Next(&timeout_us);
  if (!left.ok()) {
    *result = Slice();
    return left;
  }
  IOStatus s = ToIOStatus(h.read_at(offset, Out(scratch, n), timeout_us, got));
  *result = Slice(scratch, s.ok() ? got : 0);
  return s;
}

// Direct I/O (RocksDB's use_direct_reads / use_direct_io_for_flush_and_
// compaction): the handle reads around BlobFS's cache, reads must be aligned
// to the device block (the bridge refuses others, as O_DIRECT does), and
// RocksDB is told both, so it aligns its buffers and keeps its own cache.

class BlobSequentialFile : public FSSequentialFile {
 public:
  BlobSequentialFile(rust::Box<FileHandle> h, bool direct)
      : h_(std::move(h)), direct_(direct) {}
  ~BlobSequentialFile() override { h_->close(); }

  bool use_direct_io() const override { return direct_; }
  size_t GetRequiredBufferAlignment() const override {
    return direct_ ? h_->alignment() : FSSequentialFile::GetRequiredBufferAlignment();
  }

  IOStatus Read(size_t n, const IOOptions& opts, Slice* result, char* scratch,
                IODebugContext*) override {
    IOStatus s = ReadAt(*h_, pos_, n, result, scratch, ReadLimit(opts));
    pos_ += result->size();
    return s;
  }
  IOStatus PositionedRead(uint64_t offset, size_t n, const IOOptions& opts,
                          Slice* result, char* scratch,
                          IODebugContext*) override {
    return ReadAt(*h_, offset, n, result, scratch, ReadLimit(opts));
  }
  IOStatus Skip(uint64_t n) override {
    pos_ = std::min(pos_ + n, h_->len());
    return IOStatus::OK();
  }

 private:
  rust::Box<FileHandle> h_;
  const bool direct_;
  uint64_t pos_ = 0;
};

// A ReadAsync whose device reads are in flight: finished by the file
// system's Poll (the callback gets the bytes) or given up by AbortIO (the
// callback gets Aborted), on the thread that started it; deleted by
// RocksDB through the deleter ReadAsync hands out.
struct AsyncReadHandle {
  rust::Box<AsyncRead> read;
  FSReadRequest req;
  std::function<void(FSReadRequest&, void*)> cb;
  void* cb_arg;
  bool done = false;

  void Finish() {
    if (done) return;
    size_t n = 0;
    req.status = ToIOStatus(read->finish(n));
    req.result = Slice(req.scratch, req.status.ok() ? n : 0);
    done = true;
    cb(req, cb_arg);
  }
  void Abort() {
    if (done) return;
    read->abort();
    req.status = IOStatus::Aborted("ReadAsync aborted");
    req.result = Slice();
    done = true;
    cb(req, cb_arg);
  }
};

class BlobRandomAccessFile : public FSRandomAccessFile {
 public:
  BlobRandomAccessFile(rust::Box<FileHandle> h, bool direct)
      : h_(std::move(h)), direct_(direct) {}
  ~BlobRandomAccessFile() override { h_->close(); }

  bool use_direct_io() const override { return direct_; }
  size_t GetRequiredBufferAlignment() const override {
    return direct_ ? h_->alignment()
                   : FSRandomAccessFile::GetRequiredBufferAlignment();
  }

  IOStatus Read(uint64_t offset, size_t n, const IOOptions& opts,
                Slice* result, char* scratch, IODebugContext*) const override {
    return ReadAt(*h_, offset, n, result, scratch, ReadLimit(opts));
  }
  // Every request's device reads are submitted before any is waited for,
  // so the device queue sees the whole batch; each request gets its own
  // status. The time limit is the whole call's.
  IOStatus MultiRead(FSReadRequest* reqs, size_t num_reqs,
                     const IOOptions& opts, IODebugContext*) override {
    std::vector<ReadSpan> spans(num_reqs);
    std::vector<uint8_t*> bufs(num_reqs);
    std::vector<size_t> got(num_reqs, 0);
    for (size_t i = 0; i < num_reqs; ++i) {
      spans[i] = ReadSpan{reqs[i].offset, reqs[i].len};
      bufs[i] = reinterpret_cast<uint8_t*>(reqs[i].scratch);
    }
    uint64_t timeout_us = 0;
    IOStatus left = ReadLimit(opts).Next(&timeout_us);
    if (!left.ok()) {
      for (size_t i = 0; i < num_reqs; ++i) {
        reqs[i].result = Slice();
        reqs[i].status = left;
      }
      return IOStatus::OK();
    }
    rust::Vec<Status> statuses;
    h_->multi_read(rust::Slice<const ReadSpan>(spans.data(), spans.size()),
                   bufs.data(), timeout_us,
                   rust::Slice<size_t>(got.data(), got.size()), statuses);
    for (size_t i = 0; i < num_reqs; ++i) {
      FSReadRequest& r = reqs[i];
      r.status = i < statuses.size()
                     ? ToIOStatus(statuses[i])
                     : IOStatus::IOError("MultiRead: no status for a request");
      r.result = Slice(r.scratch, r.status.ok() ? got[i] : 0);
    }
    return IOStatus::OK();
  }
  // Warms BlobFS's read cache for the range (NotSupported when the mount has
  // no cache, so RocksDB keeps its own prefetch buffer).
  IOStatus Prefetch(uint64_t offset, size_t n, const IOOptions&,
                    IODebugContext*) override {
    return ToIOStatus(h_->prefetch(offset, n));
  }
  // The read's device I/O is submitted before this returns; the file
  // system's Poll finishes it (or AbortIO gives it up) on this thread, while
  // RocksDB's iterator works on the buffer before it. A read served from
  // memory (BlobFS's cache, a write buffer) or refused calls back at once.
  // A read with a time limit is read synchronously, where the limit holds.
  IOStatus ReadAsync(FSReadRequest& req, const IOOptions& opts,
                     std::function<void(FSReadRequest&, void*)> cb,
                     void* cb_arg, void** io_handle, IOHandleDeleter* del_fn,
                     IODebugContext* dbg) override {
    *io_handle = nullptr;
    *del_fn = nullptr;
    if (opts.timeout.count() > 0) {
      return FSRandomAccessFile::ReadAsync(req, opts, std::move(cb), cb_arg,
                                           io_handle, del_fn, dbg);
    }
    auto h = std::make_unique<AsyncReadHandle>(AsyncReadHandle{
        h_->start_read(req.offset, reinterpret_cast<uint8_t*>(req.scratch),
                       req.len),
        FSReadRequest(), std::move(cb), cb_arg});
    // The request's fields the callback reads (it is not copyable).
    h->req.offset = req.offset;
    h->req.len = req.len;
    h->req.scratch = req.scratch;
    if (h->read->poll()) {
      h->Finish();
      req.status = h->req.status;
      req.result = h->req.result;
      return IOStatus::OK();
    }
    *io_handle = h.release();
    *del_fn = [](void* p) { delete static_cast<AsyncReadHandle*>(p); };
    return IOStatus::OK();
  }
  IOStatus GetFileSize(uint64_t* size) override {
    *size = h_->len();
    return IOStatus::OK();
  }

 private:
  rust::Box<FileHandle> h_;
  const bool direct_;
};

// A file opened with use_mmap_reads: RocksDB then reads with a null
// scratch and keeps the returned slice as long as the file is open, as it
// would keep a pointer into a mapping. The file's bytes, as long as it was
// at open (a POSIX mapping has that length too), are copied on first touch,
// one chunk at a time, into an anonymous mapping that lives as long as this
// object; no byte is read from BlobFS twice.
class BlobMmapReadFile : public FSRandomAccessFile {
 public:
  static constexpr uint64_t kChunk = 1 << 20;

  BlobMmapReadFile(rust::Box<FileHandle> h, uint64_t size, char* mem)
      : h_(std::move(h)),
        size_(size),
        mem_(mem),
        filled_((size + kChunk - 1) / kChunk) {}
  ~BlobMmapReadFile() override {
    if (mem_ != nullptr) munmap(mem_, size_);
    h_->close();
  }

  // The mapping for a file of `size` bytes (nullptr for an empty file, or
  // when the kernel refuses: the caller reports that).
  static char* Map(uint64_t size) {
    if (size == 0) return nullptr;
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? nullptr : static_cast<char*>(p);
  }

  IOStatus Read(uint64_t offset, size_t n, const IOOptions& opts,
                Slice* result, char*, IODebugContext*) const override {
    return ReadWithin(offset, n, result, ReadLimit(opts));
  }
  IOStatus MultiRead(FSReadRequest* reqs, size_t num_reqs,
                     const IOOptions& opts, IODebugContext*) override {
    const ReadLimit limit(opts);
    for (size_t i = 0; i < num_reqs; ++i) {
      FSReadRequest& r = reqs[i];
      r.status = ReadWithin(r.offset, r.len, &r.result, limit);
    }
    return IOStatus::OK();
  }
  IOStatus GetFileSize(uint64_t* size) override {
    *size = size_;
    return IOStatus::OK();
  }

 private:
  IOStatus ReadWithin(uint64_t offset, size_t n, Slice* result,
                      const ReadLimit& limit) const {
    *result = Slice();
    if (offset >= size_ || n == 0) return IOStatus::OK();
    const uint64_t end = std::min<uint64_t>(size_, offset + n);
    IOStatus s = Fill(offset, end, limit);
    if (s.ok()) *result = Slice(mem_ + offset, end - offset);
    return s;
  }

  // Copies the chunks under [from, to) in, once each, within `limit` (a
  // chunk that timed out stays unfilled).
  IOStatus Fill(uint64_t from, uint64_t to, const ReadLimit& limit) const {
    std::lock_guard<std::mutex> g(mu_);
    for (uint64_t c = from / kChunk; c * kChunk < to; ++c) {
      if (filled_[c]) continue;
      const uint64_t at = c * kChunk;
      const size_t len = static_cast<size_t>(std::min(kChunk, size_ - at));
      Slice got;
      IOStatus s = ReadAt(*h_, at, len, &got, mem_ + at, limit);
      if (!s.ok()) return s;
      if (got.size() != len) {
        return IOStatus::Corruption("file shorter than at open: read " +
                                    std::to_string(got.size()) + " of " +
                                    std::to_string(len) + " bytes at " +
                                    std::to_string(at));
      }
      filled_[c] = true;
    }
    return IOStatus::OK();
  }

  rust::Box<FileHandle> h_;
  const uint64_t size_;
  char* const mem_;
  mutable std::mutex mu_;
  mutable std::vector<bool> filled_;
};

class BlobWritableFile : public FSWritableFile {
 public:
  BlobWritableFile(rust::Box<FileHandle> h, const FileOptions& opts)
      : FSWritableFile(opts), h_(std::move(h)), direct_(opts.use_direct_writes) {}
  ~BlobWritableFile() override { h_->close(); }

  // Direct writes: RocksDB then writes whole aligned blocks with
  // PositionedAppend (rewriting the last partial one) and truncates to the
  // real length at close; BlobFS takes both as any write.
  bool use_direct_io() const override { return direct_; }
  size_t GetRequiredBufferAlignment() const override {
    return direct_ ? h_->alignment()
                   : FSWritableFile::GetRequiredBufferAlignment();
  }

  IOStatus Append(const Slice& data, const IOOptions&,
                  IODebugContext*) override {
    return ToIOStatus(h_->append(In(data)));
  }
  IOStatus PositionedAppend(const Slice& data, uint64_t offset,
                            const IOOptions&, IODebugContext*) override {
    return ToIOStatus(h_->write_at(offset, In(data)));
  }
  IOStatus Truncate(uint64_t size, const IOOptions&,
                    IODebugContext*) override {
    return ToIOStatus(h_->truncate(size));
  }
  IOStatus Close(const IOOptions&, IODebugContext*) override {
    return ToIOStatus(h_->close());
  }
  // Appends are visible to readers as soon as Append returns; only Sync
  // makes them durable, so Flush has nothing to do.
  IOStatus Flush(const IOOptions&, IODebugContext*) override {
    return IOStatus::OK();
  }
  IOStatus Sync(const IOOptions&, IODebugContext*) override {
    return ToIOStatus(h_->sync());
  }
  IOStatus Fsync(const IOOptions&, IODebugContext*) override {
    return ToIOStatus(h_->sync());
  }
  bool IsSyncThreadSafe() const override { return true; }
  uint64_t GetFileSize(const IOOptions&, IODebugContext*) override {
    return h_->len();
  }
  // BlobFS allocates clusters as a file grows; there is nothing to reserve.
  IOStatus Allocate(uint64_t, uint64_t, const IOOptions&,
                    IODebugContext*) override {
    return IOStatus::OK();
  }
  // A write-back hint on POSIX; BlobFS makes data durable only at Sync, and
  // RocksDB's strict_bytes_per_sync asks for exactly that.
  IOStatus RangeSync(uint64_t, uint64_t, const IOOptions& options,
                     IODebugContext* dbg) override {
    return strict_bytes_per_sync_ ? Sync(options, dbg) : IOStatus::OK();
  }

 private:
  rust::Box<FileHandle> h_;
  const bool direct_;
};

class BlobRandomRWFile : public FSRandomRWFile {
 public:
  explicit BlobRandomRWFile(rust::Box<FileHandle> h) : h_(std::move(h)) {}
  ~BlobRandomRWFile() override { h_->close(); }

  IOStatus Write(uint64_t offset, const Slice& data, const IOOptions&,
                 IODebugContext*) override {
    return ToIOStatus(h_->write_at(offset, In(data)));
  }
  IOStatus Read(uint64_t offset, size_t n, const IOOptions& opts,
                Slice* result, char* scratch, IODebugContext*) const override {
    return ReadAt(*h_, offset, n, result, scratch, ReadLimit(opts));
  }
  IOStatus Flush(const IOOptions&, IODebugContext*) override {
    return IOStatus::OK();
  }
  IOStatus Sync(const IOOptions&, IODebugContext*) override {
    return ToIOStatus(h_->sync());
  }
  IOStatus Close(const IOOptions&, IODebugContext*) override {
    return ToIOStatus(h_->close());
  }

 private:
  rust::Box<FileHandle> h_;
};

// Namespace changes in BlobFS are durable when the call returns, so a
// directory has nothing left to sync.
class BlobDirectory : public FSDirectory {
 public:
  IOStatus Fsync(const IOOptions&, IODebugContext*) override {
    return IOStatus::OK();
  }
  IOStatus Close(const IOOptions&, IODebugContext*) override {
    return IOStatus::OK();
  }
};

class BlobLock : public FileLock {
 public:
  explicit BlobLock(rust::Box<LockHandle> h) : h_(std::move(h)) {}

 private:
  rust::Box<LockHandle> h_;
};

}  // namespace files
}  // namespace blobfs_rocksdb
