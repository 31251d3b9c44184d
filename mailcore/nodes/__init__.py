"""The node registry: the nodes sharing a PostgreSQL store, each recorded once, and the
checks that they can work together.

Behind a load balancer, nodes sharing one database must see the same files under
`files_dir` and hold the same secret keys: a file uploaded through one node must download
through another, and what one node signs or encrypts, another must verify or decrypt. Each
running node keeps one row in the table `nodes` (`mailcore.nodes.model`): when it last said
it runs (the database's clock) and what it declares, its files marker
(`mailcore.nodes.files`) and its key fingerprints (`mailcore.nodes.keys`). Its
`NodeRegistry` (`mailcore.nodes.registry`) records the row at the daemon's start and again
every `CHECK_INTERVAL`, and runs each check over the declarations of the other nodes seen
within `STALE`; a node stopped cleanly removes its row. Nothing is refused: what a check
finds is an error in the log, once per problem.

The package's own module imports nothing: each part is imported from its module.
"""
