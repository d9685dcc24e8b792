# Builds db_bench, db_stress, env_basic_test, ldb and sst_dump from the
# RocksDB sources of the librocksdb-sys crate, linked with the BlobFS
# plugin. Called by the main Makefile's `rocksdb-tools` target, which
# passes:
#   ROCKSDB_SRC  the crate's rocksdb/ directory (from `cargo metadata`)
#   PLUGIN_LIB   the production librocksdb_env.a: the Rust staticlib, which
#                holds BlobFS, the cxx bridge, cpp/blobfs_fs.cc (with
#                blobfs_files.h) and (bundled
#                by rustc from librocksdb-sys) the one librocksdb.a build
#   TESTING_PLUGIN_LIB  the same built with rocksdb-env's feature `testing`
#                (powerloss=on, fault_injection=on), for db_stress, which
#                the crash tests run on the power-loss device (default:
#                PLUGIN_LIB)
#   OUT          where the binaries go (target/rocksdb)
#   COMPRESSION_INCLUDES  -I flags for the compression libraries' headers
#                (cpp/rocksdb-src.sh includes), which util/compression.h
#                includes under the library's -DSNAPPY -DLZ4 -DZSTD -DZLIB
#
# RocksDB's library is never compiled here: only the tools' own sources,
# with the library's defines (cpp/rocksdb-flags.txt) plus GFLAGS=1.

ROCKSDB_SRC ?= $(error ROCKSDB_SRC is not set)
PLUGIN_LIB ?= $(error PLUGIN_LIB is not set)
TESTING_PLUGIN_LIB ?= $(PLUGIN_LIB)
OUT ?= $(error OUT is not set)
COMPRESSION_INCLUDES ?= $(error COMPRESSION_INCLUDES is not set)

CXX ?= g++
HERE := $(dir $(lastword $(MAKEFILE_LIST)))
OBJ := $(OUT)/obj

# librocksdb.a's build_version.cc defines RocksDbIOUringEnable, and so do
# db_bench_tool.cc and db_stress_gflags.cc: rename the tools' copies (the
# library is built without io_uring, so the hook is unused either way).
TOOL_CXXFLAGS := $(shell cat $(HERE)rocksdb-flags.txt) -DGFLAGS=1 \
  -DRocksDbIOUringEnable=RocksDbIOUringEnable_unused_in_tools \
  -I$(ROCKSDB_SRC)/include -I$(ROCKSDB_SRC) \
  -I$(ROCKSDB_SRC)/third-party/gtest-1.8.1/fused-src $(COMPRESSION_INCLUDES) \
  -O2 -fno-omit-frame-pointer -w

# A plugin archive, everything the Rust staticlib needs from the system
# (rustc --print native-static-libs), gflags, and the C++ runtime.
tool_libs = -Wl,-u,blobfs_rocksdb_plugin_anchor $(1) \
  -lgflags -lstdc++ -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
TOOL_LIBS := $(call tool_libs,$(PLUGIN_LIB))

BENCH_SRCS := tools/db_bench.cc tools/db_bench_tool.cc tools/tool_hooks.cc \
  tools/simulated_hybrid_file_system.cc test_util/testutil.cc

include $(HERE)rocksdb-stress-srcs.mk

ENV_TEST_SRCS := env/env_basic_test.cc test_util/testharness.cc \
  test_util/testutil.cc third-party/gtest-1.8.1/fused-src/gtest/gtest-all.cc

# ldb and sst_dump: RocksDB's inspection tools (their mains and
# TOOL_LIB_SOURCES of src.mk), which take --env_uri/--fs_uri like the others.
LDB_SRCS := tools/ldb.cc tools/ldb_cmd.cc tools/ldb_tool.cc \
  tools/sst_dump_tool.cc utilities/blob_db/blob_dump_tool.cc \
  db_stress_tool/db_stress_compression_manager.cc
SST_DUMP_SRCS := tools/sst_dump.cc $(filter-out tools/ldb.cc,$(LDB_SRCS))

objs = $(patsubst %.cc,$(OBJ)/%.o,$(1))

.PHONY: all
all: $(OUT)/db_bench $(OUT)/db_stress $(OUT)/env_basic_test $(OUT)/ldb $(OUT)/sst_dump

# The objects depend on the flags' content, not on the file's mtime: a
# fresh checkout gives rocksdb-flags.txt a new mtime, which made every CI
# run recompile all 35 tool sources against a warm build cache. The stamp
# is rewritten (and its mtime moves) only when the flags differ.
FLAGS_STAMP := $(OBJ)/rocksdb-flags.stamp

$(FLAGS_STAMP): FORCE
	@mkdir -p $(dir $@)
	@cmp -s $(HERE)rocksdb-flags.txt $@ || cp $(HERE)rocksdb-flags.txt $@

.PHONY: FORCE
FORCE:

$(OBJ)/%.o: $(ROCKSDB_SRC)/%.cc $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	$(CXX) $(TOOL_CXXFLAGS) -c $< -o $@

$(OUT)/db_bench: $(call objs,$(BENCH_SRCS)) $(PLUGIN_LIB)
	$(CXX) -o $@ $(call objs,$(BENCH_SRCS)) $(TOOL_LIBS)

$(OUT)/db_stress: $(call objs,$(STRESS_SRCS)) $(TESTING_PLUGIN_LIB)
	$(CXX) -o $@ $(call objs,$(STRESS_SRCS)) $(call tool_libs,$(TESTING_PLUGIN_LIB))

$(OUT)/env_basic_test: $(call objs,$(ENV_TEST_SRCS)) $(PLUGIN_LIB)
	$(CXX) -o $@ $(call objs,$(ENV_TEST_SRCS)) $(TOOL_LIBS)

$(OUT)/ldb: $(call objs,$(LDB_SRCS)) $(PLUGIN_LIB)
	$(CXX) -o $@ $(call objs,$(LDB_SRCS)) $(TOOL_LIBS)

$(OUT)/sst_dump: $(call objs,$(SST_DUMP_SRCS)) $(PLUGIN_LIB)
	$(CXX) -o $@ $(call objs,$(SST_DUMP_SRCS)) $(TOOL_LIBS)

# Just the tool objects (they need RocksDB's headers, not its library).
.PHONY: objects
objects: $(call objs,$(sort $(BENCH_SRCS) $(STRESS_SRCS) $(ENV_TEST_SRCS) $(LDB_SRCS) $(SST_DUMP_SRCS)))
