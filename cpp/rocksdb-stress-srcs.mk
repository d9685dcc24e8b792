# db_stress's sources, shared by rocksdb-tools.mk (release tools) and
# rocksdb-debug.mk (the debug db_stress): the same lists as RocksDB's src.mk
# STRESS_LIB_SOURCES, TOOL_LIB_SOURCES, ANALYZER_LIB_SOURCES, the db_stress
# main and testutil.
STRESS_SRCS := db_stress_tool/db_stress.cc \
  db_stress_tool/batched_ops_stress.cc db_stress_tool/cf_consistency_stress.cc \
  db_stress_tool/db_stress_common.cc db_stress_tool/db_stress_compaction_service.cc \
  db_stress_tool/db_stress_compression_manager.cc db_stress_tool/db_stress_driver.cc \
  db_stress_tool/db_stress_filters.cc db_stress_tool/db_stress_gflags.cc \
  db_stress_tool/db_stress_listener.cc db_stress_tool/db_stress_shared_state.cc \
  db_stress_tool/db_stress_test_base.cc db_stress_tool/db_stress_tool.cc \
  db_stress_tool/db_stress_wide_merge_operator.cc db_stress_tool/expected_state.cc \
  db_stress_tool/expected_value.cc db_stress_tool/no_batched_ops_stress.cc \
  db_stress_tool/multi_ops_txns_stress.cc \
  tools/io_tracer_parser_tool.cc tools/ldb_cmd.cc tools/ldb_tool.cc \
  tools/sst_dump_tool.cc utilities/blob_db/blob_dump_tool.cc \
  tools/block_cache_analyzer/block_cache_trace_analyzer.cc \
  tools/trace_analyzer_tool.cc test_util/testutil.cc
