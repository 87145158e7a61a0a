-- Receptive agents: how to dial each agent. One configuration per agent (the UNIQUE
-- constraint decides under concurrency). Private keys and client keys are stored only as
-- AES-256-GCM envelopes bound to their table, column and row.
CREATE TABLE agent_url_configurations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id INTEGER NOT NULL UNIQUE REFERENCES cluster_agents (id) ON DELETE CASCADE,
    url TEXT NOT NULL,
    public_key TEXT,
    private_key BLOB,
    client_cert TEXT,
    client_key BLOB,
    ca_cert TEXT,
    tls_host TEXT,
    created_by_user_id INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    -- JWT (public key) or mTLS (client certificate), never both.
    CHECK ((public_key IS NULL) <> (client_cert IS NULL))
);
