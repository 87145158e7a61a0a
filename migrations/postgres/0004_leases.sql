-- Several replicas on one database: a lease per replica (renewed with one statement per
-- heartbeat, whatever the number of agents) and an assignment per agent, written only when the
-- agent changes hands. All lease arithmetic uses the database's clock.
CREATE TABLE replicas (
    incarnation TEXT PRIMARY KEY,
    replica_id TEXT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);

-- holder is the incarnation that dials the agent while its lease is live; NULL or a dead
-- holder: free to claim. epoch grows on every change of holder (a fencing number).
CREATE TABLE agent_assignments (
    agent_id BIGINT PRIMARY KEY REFERENCES cluster_agents (id) ON DELETE CASCADE,
    holder TEXT,
    epoch BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX agent_assignments_holder ON agent_assignments (holder);
