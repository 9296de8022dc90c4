"""Writes the Parquet test files with pyarrow (26.0.1 here), as Python users produce them.

Run from this folder: python make.py. The expected records are written out by hand in
tests/integration/data_columnar.rs, not read from here.
"""
import pyarrow as pa
import pyarrow.parquet as pq

messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
table = pa.table(
    {
        "prompt": pa.array(["Who are you?", None, "Café ☕ — naïve?", "Ping"], pa.large_string()),
        "response": pa.array(["🤖💬", None, "oui", "pong"]),
        "label": pa.array([1, 0, None, 7], pa.int32()),
        "topic": pa.array(["bot", "chat", "food", "bot"]).dictionary_encode(),
        "messages": pa.array(
            [None, [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}], None, None],
            messages,
        ),
        "score": pa.array([0.5, 1.25, -2.0, 3.0], pa.float64()),
    }
)
# Snappy is pyarrow's (and so pandas' and `datasets`') default; two rows per row group.
pq.write_table(table, "pyarrow_snappy.parquet", row_group_size=2)
pq.write_table(table, "pyarrow_zstd_v1.parquet", compression="zstd", data_page_version="1.0", use_dictionary=False)
pq.write_table(table, "pyarrow_gzip_v2.parquet", compression="gzip", data_page_version="2.0")
