"""Remote mailbox passwords encrypted at rest (Fernet: AES-128-CBC with HMAC-SHA256).

The key is given in the configuration (`[fetch] secret_key`) or kept in the data directory
as `fetch.key`, mode 0600, generated on first use. Ciphertext is all the database ever holds;
the clear password exists only in memory while a session logs in.

Either may hold several keys (one a line in the file; separated by commas or spaces in the
setting): the first encrypts, each decrypts. That is how the key is changed without losing
what the old one encrypted (`mailcore secrets rotate`, mailcore.fetch.rekey). A stored
secret of no bytes is one the operator gave up with a lost key (`mailcore secrets forget`):
it opens with no key, and says so.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import Column, Engine, select

from mailcore.files import write_whole

KEY_FILE = "fetch.key"
FORGOTTEN = b""  # a secret given up with a lost key (`mailcore secrets forget`)


class SecretError(Exception):
    """A stored secret cannot be decrypted (wrong or rotated key, damaged ciphertext)."""


def parse_keys(text: bytes | str) -> list[bytes]:
    """The keys of a key file or of `[fetch] secret_key`: one a line, or separated by
    commas or spaces (none of which a Fernet key holds), the current one first."""
    if isinstance(text, str):
        text = text.encode("ascii", "replace")
    return [k for k in re.split(rb"[\s,]+", text) if k]


class SecretBox:
    """Encrypts short secrets with the first of its Fernet keys, decrypts with any."""

    def __init__(self, key: bytes | Sequence[bytes]) -> None:
        self.keys = [key] if isinstance(key, bytes) else list(key)
        if not self.keys:
            raise SecretError("no fetch secret key is given")
        try:
            self._fernet = MultiFernet([Fernet(k) for k in self.keys])
        except (ValueError, TypeError) as e:
            raise SecretError(f"the fetch secret key is not a valid Fernet key: {e}") from None

    @classmethod
    def generate(cls) -> SecretBox:
        """A box with a fresh random key (tests)."""
        return cls(Fernet.generate_key())

    @classmethod
    def from_data_dir(cls, data_dir: Path, configured: str | None = None) -> SecretBox:
        """The configured keys, else those in `data_dir/fetch.key` (made 0600 if absent).

        Blocks on the file system: call at start-up, before the reactor runs.
        """
        if configured:
            return cls(parse_keys(configured))
        path = data_dir / KEY_FILE
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            stored = parse_keys(path.read_bytes())
        except FileNotFoundError:
            stored = []
        else:
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
            if not stored:
                # What an older version killed while making the key left: nothing was
                # encrypted with it. Made again, instead of stopping every start.
                path.unlink(missing_ok=True)
        if stored:
            return cls(stored)
        key = Fernet.generate_key()
        # Whole or not at all (a crash leaves no empty or cut-short key file).
        if not write_whole(path, key + b"\n", replace=False):  # made meanwhile: theirs
            return cls.from_data_dir(data_dir)
        return cls(key)

    def encrypt(self, secret: str) -> bytes:
        return self._fernet.encrypt(secret.encode("utf-8"))

    def decrypt(self, token: bytes) -> str:
        token = bytes(token)
        if token == FORGOTTEN:
            raise SecretError("the stored secret was given up with a lost fetch key "
                              "(mailcore secrets forget): set it again")
        try:
            return self._fernet.decrypt(token).decode("utf-8")
        except (InvalidToken, UnicodeDecodeError):
            raise SecretError(
                "the stored password cannot be decrypted with the current key"
            ) from None

    def rotate(self, token: bytes) -> bytes:
        """`token` encrypted again with the first key (SecretError: no key opens it)."""
        try:
            return self._fernet.rotate(bytes(token))
        except InvalidToken:
            raise SecretError("no key decrypts the stored secret") from None


class KeyFileSecretBox(SecretBox):
    """A SecretBox whose key is read (or made) from the data directory on first use, so
    building the services touches no file; the daemon calls `load()` at start-up."""

    def __init__(self, data_dir: Path, configured: str | None = None) -> None:
        self._data_dir = data_dir
        self._configured = configured
        self._box: SecretBox | None = None

    def load(self) -> SecretBox:
        """The real box (blocks on the file system the first time)."""
        if self._box is None:
            self._box = SecretBox.from_data_dir(self._data_dir, self._configured)
        return self._box

    def encrypt(self, secret: str) -> bytes:
        return self.load().encrypt(secret)

    def decrypt(self, token: bytes) -> str:
        return self.load().decrypt(token)


def encrypted_columns() -> list[Column]:  # type: ignore[type-arg]
    """Every column that holds a Fernet token of this key."""
    from mailcore.store.schema import drop_bundles, fetch_accounts, mailbox_jobs, webhooks

    return [fetch_accounts.c.password_enc, mailbox_jobs.c.password_enc,
            webhooks.c.secret_enc, drop_bundles.c.secure_message]


def check_key_blocking(engine: Engine, data_dir: Path, configured: str | None = None) -> None:
    """Refuse to start with a key that cannot open what the database holds.

    A missing `fetch.key` would be made anew, and a changed one read, without a word: every
    remote mailbox sync, webhook delivery (given up at once) and secure message would then
    fail one by one. When the database holds a secret, the key must exist and open one of
    each kind; else SecretError says which key to restore. Blocks: call at start-up.
    """
    samples = []
    with engine.connect() as conn:
        for column in encrypted_columns():
            token = conn.execute(
                select(column).where(column.is_not(None), column != FORGOTTEN).limit(1)
            ).scalar()
            if token is not None:
                samples.append((column, bytes(token)))
    if not samples:
        return
    where = "[fetch] secret_key" if configured else str(data_dir / KEY_FILE)
    if not configured and not (data_dir / KEY_FILE).exists():
        raise SecretError(
            f"{where} is missing, but the database holds secrets encrypted with it "
            f"(remote mailbox passwords, webhook secrets): restore that file (or set "
            f"[fetch] secret_key to its key); if it is lost for good, `mailcore secrets "
            f"forget` gives up those secrets so that the daemon starts"
        )
    box = SecretBox.from_data_dir(data_dir, configured)
    for column, token in samples:
        try:
            box.decrypt(token)
        except SecretError:
            raise SecretError(
                f"the key in {where} does not decrypt the secrets in the database "
                f"({column.table.name}.{column.name}): it is not the key they were "
                f"encrypted with; restore that key (or, if it is lost for good, run "
                f"`mailcore secrets forget`)"
            ) from None
