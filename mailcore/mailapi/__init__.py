"""The Mail API's model (seed 002): hosted mailboxes with local delivery, drafts, a FIFO outbox
that sends through the queue, and shared mailboxes with access grants.

Empty for now: the Mail API's services land here (web/mailapi.py only translates its wire
format). Only its auth routes are served today.
"""
