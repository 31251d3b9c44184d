"""SMTP on both sides: the envelope and queue ids (`envelope`, `queueid`), the inbound ESMTP
server with its acceptance policy and limits (`server`, `address`), and the outbound client
that delivers to a next hop (`client`, `dotstuff`, `dsn`)."""
