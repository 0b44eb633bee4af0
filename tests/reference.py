"""Independent references the tests compare the server with: none of it calls chunkserver's
code or the library the server computes with.

- `crc64nvme`: CRC-64/NVME bit by bit from its published parameters (reflected polynomial
  0x9a6c9329ac4bc9b5, initial value and final xor all ones); its check value, the CRC of
  b"123456789", is 0xae8b14860a799888. Slow (about 10 MB/s): for small inputs, and to check
  the fast function the other tests use.
- `metric_value`: one sample of Prometheus' text format, by its whole name and labels.
"""

from __future__ import annotations

POLYNOMIAL = 0x9A6C9329AC4BC9B5  # 0xad93d23594c93659, reflected
ALL_ONES = 0xFFFF_FFFF_FFFF_FFFF
CHECK_VALUE = 0xAE8B14860A799888


def _table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ POLYNOMIAL if crc & 1 else crc >> 1
        table.append(crc)
    return table


TABLE = _table()


def crc64nvme(data: bytes) -> int:
    crc = ALL_ONES
    for byte in data:
        crc = TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ ALL_ONES


def metric_value(text: str, sample: str) -> float:
    """The value of the sample named exactly `sample` (labels included, as in
    `chunkserver_requests_total{status="206"}`); AssertionError when there is none."""
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if not line.startswith("#") and name == sample:
            return float(value)
    raise AssertionError(f"no sample {sample} in the metrics")
