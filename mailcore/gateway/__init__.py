"""The MX gateway's own logic: which domains and addresses we serve (`domains`), where their
mail may go (`redirects`), the filtering stage and per-domain spam/virus policy
(`filtering`), and the quarantine with its release links and digests (`quarantine`)."""
