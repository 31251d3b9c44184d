"""The mail queue: durable spool, leased per-recipient state, the pipeline, delivery, bounces.

Its modules each hold one part; `mailcore.queue.assembly.build_queue` wires them for the
Core. This package's own module imports nothing, so a caller that needs one small part (the
next-hop policy, the settings' TLS policies) does not load the whole queue with it.
"""
