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
// The file objects it hands out, and the conversions both share, are in
// blobfs_files.h (included here only).
//
// Invariants:
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

#include "blobfs_files.h"
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
using ROCKSDB_NAMESPACE::FSSequentialFile;
using ROCKSDB_NAMESPACE::FSWritableFile;
using ROCKSDB_NAMESPACE::IODebugContext;
using ROCKSDB_NAMESPACE::IOOptions;
using ROCKSDB_NAMESPACE::IOStatus;
using ROCKSDB_NAMESPACE::ObjectLibrary;
using files::AsyncReadHandle;
using files::BlobDirectory;
using files::BlobLock;
using files::BlobMmapReadFile;
using files::BlobRandomAccessFile;
using files::BlobRandomRWFile;
using files::BlobSequentialFile;
using files::BlobWritableFile;
using files::PosixPath;
using files::Str;
using files::ToIOStatus;

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
