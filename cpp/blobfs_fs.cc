// The RocksDB FileSystem on BlobFS: a thin shell over the Rust bridge.
//
// Every method forwards to rocksdb-env/src/bridge.rs and turns the returned
// Status into an IOStatus; no file-system logic lives here. Calls run on the
// calling RocksDB thread: every read, sync and metadata change BlobFS does
// for them is submitted and completed there. The one hand-off is BlobFS's
// write-behind: a full 4 MiB append buffer goes to the mount's writer
// thread (one per mount, shared by all files, one write at a time); a call
// waits for it only when it needs those bytes on the blob (a sync of the
// file, a read of them) or fills the file's next buffer first.
//
// Invariants:
// - A file object exists only for a file BlobFS opened; its Rust handle is
//   closed exactly once (Close, or the destructor if RocksDB skipped Close).
// - Error messages come from Rust and name the file.
// - One process mounts a device once: the Rust side keeps a mount table
//   keyed by the device spec; these objects only hold references to it.

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <sys/mman.h>
#include <unistd.h>
#include <vector>

#include "blobfs_rocksdb.h"
#include "rocksdb-env/src/bridge.rs.h"
#include "rocksdb/env.h"
#include "rocksdb/file_system.h"
#include "rocksdb/io_status.h"
#include "rocksdb/convenience.h"
#include "rocksdb/utilities/object_registry.h"

// The C API's Env handle, as RocksDB 11.8.1's db/c.cc defines it (c.h only
// declares it). The `rocksdb` crate's Env::from_raw takes one, which is how
// Rust hands our Env to the RocksDB APIs that take an Env (BackupEngine);
// new_env_handle makes them. A RocksDB upgrade must check this layout.
using ROCKSDB_NAMESPACE::Env;
struct rocksdb_env_t {
  Env* rep;
  bool is_default;
};

namespace blobfs_rocksdb {
namespace {

using ROCKSDB_NAMESPACE::FileAttributes;
using ROCKSDB_NAMESPACE::FileLock;
using ROCKSDB_NAMESPACE::FileOptions;
using ROCKSDB_NAMESPACE::FileSystem;
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
using ROCKSDB_NAMESPACE::ObjectLibrary;
using ROCKSDB_NAMESPACE::Slice;

IOStatus ToIOStatus(const Status& s) {
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

rust::Str Str(const std::string& s) { return rust::Str(s.data(), s.size()); }

// A path as POSIX resolves it: a run of `/` is one separator (DBTestBase's
// names start with `/`, so its paths hold `//`), and a trailing `/` names
// the same entry. BlobFS itself accepts only single separators.
std::string PosixPath(const std::string& p) {
  std::string out;
  out.reserve(p.size());
  for (char c : p) {
    if (c == '/' && !out.empty() && out.back() == '/') continue;
    out.push_back(c);
  }
  if (out.size() > 1 && out.back() == '/') out.pop_back();
  return out;
}

rust::Slice<std::uint8_t> Out(char* p, size_t n) {
  return rust::Slice<std::uint8_t>(reinterpret_cast<std::uint8_t*>(p), n);
}

rust::Slice<const std::uint8_t> In(const Slice& s) {
  return rust::Slice<const std::uint8_t>(
      reinterpret_cast<const std::uint8_t*>(s.data()), s.size());
}

// Reads [offset, offset + n) into scratch; *result is the bytes read. A
// null scratch (what RocksDB passes to a file opened for mmap reads) is
// refused: no slice is ever built from a null pointer.
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

IOStatus ReadAt(const FileHandle& h, uint64_t offset, size_t n, Slice* result,
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

class BlobFileSystem : public FileSystem {
 public:
  BlobFileSystem(rust::Box<Fs> fs, std::string uri)
      : fs_(std::move(fs)), uri_(std::move(uri)) {}

  static const char* kClassName() { return "BlobFS"; }
  const char* Name() const override { return kClassName(); }
  std::string GetId() const override { return uri_; }

  // What RocksDB may use beyond the plain calls. kAsyncIO: ReadAsync
  // submits its device reads and returns, Poll finishes them, AbortIO gives
  // them up (RocksDB's iterators with ReadOptions::async_io read ahead
  // while they work). kFSPrefetch: Prefetch warms BlobFS's cache
  // (NotSupported with cache=0, which RocksDB answers with its own buffer).
  void SupportedOps(int64_t& supported_ops) override {
    supported_ops = (1 << ROCKSDB_NAMESPACE::FSSupportedOps::kFSPrefetch) |
                    (1 << ROCKSDB_NAMESPACE::FSSupportedOps::kAsyncIO);
  }

  // Finishes every handle of ReadAsync given (waiting for its device reads
  // on this thread) and calls its callback: at least min_completions.
  IOStatus Poll(std::vector<void*>& io_handles, size_t) override {
    for (void* p : io_handles) {
      if (p != nullptr) static_cast<AsyncReadHandle*>(p)->Finish();
    }
    return IOStatus::OK();
  }
  // Gives the reads up: their buffers are not written from now on, and
  // each callback gets Aborted (as RocksDB's POSIX file system does).
  IOStatus AbortIO(std::vector<void*>& io_handles) override {
    for (void* p : io_handles) {
      if (p != nullptr) static_cast<AsyncReadHandle*>(p)->Abort();
    }
    return IOStatus::OK();
  }

  IOStatus NewSequentialFile(const std::string& fname, const FileOptions& opts,
                             std::unique_ptr<FSSequentialFile>* result,
                             IODebugContext*) override {
    Status st;
    auto h = fs_->open_file(Str(PosixPath(fname)), OpenMode::Read,
                            opts.use_direct_reads, st);
    if (st.code != Code::Ok) return ToIOStatus(st);
    result->reset(new BlobSequentialFile(std::move(h), opts.use_direct_reads));
    return IOStatus::OK();
  }

  IOStatus NewRandomAccessFile(const std::string& fname,
                               const FileOptions& opts,
                               std::unique_ptr<FSRandomAccessFile>* result,
                               IODebugContext*) override {
    Status st;
    // RocksDB refuses mmap reads together with direct reads.
    auto h = fs_->open_file(Str(PosixPath(fname)), OpenMode::Read,
                            opts.use_direct_reads && !opts.use_mmap_reads, st);
    if (st.code != Code::Ok) return ToIOStatus(st);
    if (opts.use_mmap_reads) {
      const uint64_t size = h->len();
      char* mem = BlobMmapReadFile::Map(size);
      if (size > 0 && mem == nullptr) {
        return IOStatus::IOError(fname + ": cannot map " +
                                 std::to_string(size) +
                                 " bytes for mmap reads");
      }
      result->reset(new BlobMmapReadFile(std::move(h), size, mem));
      return IOStatus::OK();
    }
    result->reset(
        new BlobRandomAccessFile(std::move(h), opts.use_direct_reads));
    return IOStatus::OK();
  }

  IOStatus NewWritableFile(const std::string& fname, const FileOptions& opts,
                           std::unique_ptr<FSWritableFile>* result,
                           IODebugContext*) override {
    return OpenWritable(fname, OpenMode::CreateTruncate, opts, result);
  }

  IOStatus ReopenWritableFile(const std::string& fname,
                              const FileOptions& opts,
                              std::unique_ptr<FSWritableFile>* result,
                              IODebugContext*) override {
    return OpenWritable(fname, OpenMode::CreateKeep, opts, result);
  }

  IOStatus NewRandomRWFile(const std::string& fname, const FileOptions&,
                           std::unique_ptr<FSRandomRWFile>* result,
                           IODebugContext*) override {
    Status st;
    // As POSIX's: an existing file only (the contract: "if file doesn't
    // exist the file will not be created").
    auto h = fs_->open_file(Str(PosixPath(fname)), OpenMode::ReadWrite, false,
                            st);
    if (st.code != Code::Ok) return ToIOStatus(st);
    result->reset(new BlobRandomRWFile(std::move(h)));
    return IOStatus::OK();
  }

  IOStatus NewDirectory(const std::string& name, const IOOptions&,
                        std::unique_ptr<FSDirectory>* result,
                        IODebugContext*) override {
    bool is_dir = false;
    IOStatus s = ToIOStatus(fs_->is_dir(Str(PosixPath(name)), is_dir));
    if (!s.ok()) return s;
    if (!is_dir) return IOStatus::IOError(name + ": not a directory");
    result->reset(new BlobDirectory());
    return IOStatus::OK();
  }

  IOStatus FileExists(const std::string& fname, const IOOptions&,
                      IODebugContext*) override {
    return ToIOStatus(fs_->file_exists(Str(PosixPath(fname))));
  }

  IOStatus GetChildren(const std::string& dir, const IOOptions&,
                       std::vector<std::string>* result,
                       IODebugContext*) override {
    result->clear();
    rust::Vec<ChildAttr> out;
    IOStatus s = ToIOStatus(fs_->children(Str(PosixPath(dir)), false, out));
    if (!s.ok()) return s;
    result->reserve(out.size());
    for (const auto& c : out) result->emplace_back(std::string(c.name));
    return IOStatus::OK();
  }

  IOStatus GetChildrenFileAttributes(const std::string& dir, const IOOptions&,
                                     std::vector<FileAttributes>* result,
                                     IODebugContext*) override {
    result->clear();
    rust::Vec<ChildAttr> out;
    IOStatus s = ToIOStatus(fs_->children(Str(PosixPath(dir)), true, out));
    if (!s.ok()) return s;
    result->reserve(out.size());
    for (const auto& c : out) {
      FileAttributes a;
      a.name = std::string(c.name);
      a.size_bytes = c.size_bytes;
      result->push_back(std::move(a));
    }
    return IOStatus::OK();
  }

  IOStatus DeleteFile(const std::string& fname, const IOOptions&,
                      IODebugContext*) override {
    return ToIOStatus(fs_->delete_file(Str(PosixPath(fname))));
  }

  IOStatus Truncate(const std::string& fname, size_t size, const IOOptions&,
                    IODebugContext*) override {
    IOStatus s = ToIOStatus(fs_->file_exists(Str(PosixPath(fname))));
    if (!s.ok()) return s;
    Status st;
    auto h = fs_->open_file(Str(PosixPath(fname)), OpenMode::CreateKeep, false,
                            st);
    if (st.code != Code::Ok) return ToIOStatus(st);
    s = ToIOStatus(h->truncate(size));
    IOStatus c = ToIOStatus(h->close());
    return s.ok() ? c : s;
  }

  IOStatus CreateDir(const std::string& dirname, const IOOptions&,
                     IODebugContext*) override {
    return ToIOStatus(fs_->create_dir(Str(PosixPath(dirname)), false));
  }

  IOStatus CreateDirIfMissing(const std::string& dirname, const IOOptions&,
                              IODebugContext*) override {
    return ToIOStatus(fs_->create_dir(Str(PosixPath(dirname)), true));
  }

  IOStatus DeleteDir(const std::string& dirname, const IOOptions&,
                     IODebugContext*) override {
    return ToIOStatus(fs_->delete_dir(Str(PosixPath(dirname))));
  }

  IOStatus GetFileSize(const std::string& fname, const IOOptions&,
                       uint64_t* file_size, IODebugContext*) override {
    return ToIOStatus(fs_->file_size(Str(PosixPath(fname)), *file_size));
  }

  IOStatus GetFileModificationTime(const std::string& fname, const IOOptions&,
                                   uint64_t* file_mtime,
                                   IODebugContext*) override {
    return ToIOStatus(fs_->mtime_secs(Str(PosixPath(fname)), *file_mtime));
  }

  IOStatus RenameFile(const std::string& src, const std::string& target,
                      const IOOptions&, IODebugContext*) override {
    return ToIOStatus(fs_->rename(Str(PosixPath(src)), Str(PosixPath(target))));
  }

  // BlobFS has one name per file. RocksDB falls back to copying (backups,
  // checkpoints) or to its non-link paths when it sees NotSupported.
  IOStatus LinkFile(const std::string& src, const std::string& target,
                    const IOOptions&, IODebugContext*) override {
    return IOStatus::NotSupported("BlobFS has no hard links: " + src + " -> " +
                                  target);
  }

  IOStatus IsDirectory(const std::string& path, const IOOptions&,
                       bool* is_dir, IODebugContext*) override {
    bool d = false;
    IOStatus s = ToIOStatus(fs_->is_dir(Str(PosixPath(path)), d));
    if (s.ok() && is_dir != nullptr) *is_dir = d;
    return s;
  }

  IOStatus LockFile(const std::string& fname, const IOOptions&,
                    FileLock** lock, IODebugContext*) override {
    *lock = nullptr;
    Status st;
    auto h = fs_->lock(Str(PosixPath(fname)), st);
    // A held lock is an IO error naming the lock file, as POSIX's
    // ("lock hold by current process"): DB::Open reports it as such.
    if (st.code == Code::Busy) {
      return IOStatus::IOError("lock held: " + std::string(st.message), fname);
    }
    if (st.code != Code::Ok) return ToIOStatus(st);
    *lock = new BlobLock(std::move(h));
    return IOStatus::OK();
  }

  IOStatus UnlockFile(FileLock* lock, const IOOptions&,
                      IODebugContext*) override {
    delete static_cast<BlobLock*>(lock);
    return IOStatus::OK();
  }

  // Same place as the POSIX file system uses, created inside BlobFS, so
  // tests that mix Env::Default() and this file system agree on paths.
  IOStatus GetTestDirectory(const IOOptions& opts, std::string* path,
                            IODebugContext* dbg) override {
    const char* env = std::getenv("TEST_TMPDIR");
    if (env != nullptr && env[0] != '\0') {
      *path = env;
    } else {
      *path = "/tmp/rocksdbtest-" + std::to_string(geteuid());
    }
    return CreateDirIfMissing(*path, opts, dbg);
  }

  // BlobFS names are absolute from its root; a relative name is taken
  // from the root too.
  IOStatus GetAbsolutePath(const std::string& db_path, const IOOptions&,
                           std::string* output_path, IODebugContext*) override {
    *output_path = (!db_path.empty() && db_path[0] == '/') ? db_path
                                                           : "/" + db_path;
    return IOStatus::OK();
  }

  IOStatus GetFreeSpace(const std::string&, const IOOptions&,
                        uint64_t* diskfree, IODebugContext*) override {
    *diskfree = fs_->free_bytes();
    return IOStatus::OK();
  }

 private:
  IOStatus OpenWritable(const std::string& fname, OpenMode mode,
                        const FileOptions& opts,
                        std::unique_ptr<FSWritableFile>* result) {
    Status st;
    auto h = fs_->open_file(Str(PosixPath(fname)), mode,
                            opts.use_direct_writes, st);
    if (st.code != Code::Ok) return ToIOStatus(st);
    result->reset(new BlobWritableFile(std::move(h), opts));
    return IOStatus::OK();
  }

  rust::Box<Fs> fs_;
  std::string uri_;
};

// Opens (or shares) the mount for `uri`; null with *errmsg on failure.
std::shared_ptr<FileSystem> OpenFileSystem(const std::string& uri,
                                           std::string* errmsg) {
  Status st;
  auto fs = fs_open(Str(uri), st);
  if (st.code != Code::Ok) {
    *errmsg = std::string(st.message);
    return nullptr;
  }
  return std::make_shared<BlobFileSystem>(std::move(fs), uri);
}

int RegisterFactories() {
  ObjectLibrary& lib = *ObjectLibrary::Default();
  const auto pattern =
      ObjectLibrary::PatternEntry("blobfs", false).AddSeparator("://");
  // FileSystem: --fs_uri in the tools, TEST_FS_URI, FileSystem::CreateFromString.
  lib.AddFactory<FileSystem>(
      pattern, [](const std::string& uri, std::unique_ptr<FileSystem>* guard,
                  std::string* errmsg) -> FileSystem* {
        Status st;
        auto fs = fs_open(Str(uri), st);
        if (st.code != Code::Ok) {
          *errmsg = std::string(st.message);
          return nullptr;
        }
        guard->reset(new BlobFileSystem(std::move(fs), uri));
        return guard->get();
      });
  // Env: the `env=` option (Rust's rocksdb crate goes this way). RocksDB
  // loads Envs as static objects (no owner), so each URI gets one Env that
  // lives as long as the process, like the mount under it.
  lib.AddFactory<Env>(pattern, [](const std::string& uri,
                                  std::unique_ptr<Env>* /*guard*/,
                                  std::string* errmsg) -> Env* {
    static std::mutex mu;
    static auto* envs = new std::map<std::string, Env*>();
    std::lock_guard<std::mutex> g(mu);
    auto it = envs->find(uri);
    if (it != envs->end()) return it->second;
    auto fs = OpenFileSystem(uri, errmsg);
    if (!fs) return nullptr;
    Env* env = ROCKSDB_NAMESPACE::NewCompositeEnv(fs).release();
    envs->emplace(uri, env);
    return env;
  });
  return 2;
}

}  // namespace

std::int32_t register_blobfs() {
  static const int registered = RegisterFactories();
  return registered;
}

rocksdb_env_t* new_env_handle(rust::Str options_value, Status& status) {
  register_blobfs();
  const std::string value(options_value.data(), options_value.size());
  Env* env = nullptr;
  std::shared_ptr<Env> guard;
  const auto s = Env::CreateFromString(ROCKSDB_NAMESPACE::ConfigOptions(),
                                       value, &env, &guard);
  if (!s.ok() || env == nullptr || guard) {
    status.code = Code::InvalidArgument;
    status.message = rust::String(
        s.ok() ? value + ": not a process-lived BlobFS Env" : s.ToString());
    return nullptr;
  }
  // The factory's Env lives for the process, so the handle must not own
  // it: is_default tells rocksdb_env_destroy to free the handle only.
  return new rocksdb_env_t{env, true};
}

}  // namespace blobfs_rocksdb

// Runs the registration before main in any program that links this object
// (C linkage from the declaration in blobfs_rocksdb.h).
int blobfs_rocksdb_plugin_anchor = blobfs_rocksdb::register_blobfs();
