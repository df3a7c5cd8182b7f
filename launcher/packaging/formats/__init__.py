"""Byte formats lalo writes and reads: llamafiles, ZIP64 records, reproducible archives, the
single binary's appended payload."""
