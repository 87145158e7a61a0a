-- One check value per encryption key id (128 bits of HMAC-SHA256 keyed with the key): a
-- gateway whose key differs from the recorded one for the same id refuses to start, rather
-- than failing to open every secret sealed by the others.
CREATE TABLE encryption_key_checks (
    key_id TEXT PRIMARY KEY,
    check_value TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
