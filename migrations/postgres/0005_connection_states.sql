-- Connection states in the database, so that every replica answers alike. A row is written by
-- the agent's holder on each transition (batched), fenced by its assignment: only the
-- incarnation the assignment names, with the assignment's epoch, may write it.
ALTER TABLE replicas ADD COLUMN private_api_url TEXT;

CREATE TABLE agent_connections (
    agent_id BIGINT PRIMARY KEY REFERENCES cluster_agents (id) ON DELETE CASCADE,
    url_configuration_id BIGINT NOT NULL
        REFERENCES agent_url_configurations (id) ON DELETE CASCADE,
    url TEXT NOT NULL,
    phase TEXT NOT NULL,
    last_error TEXT,
    last_attempt_at BIGINT,
    connected_since BIGINT,
    last_error_at BIGINT,
    agent_version TEXT,
    agent_commit TEXT,
    pod_namespace TEXT,
    pod_name TEXT,
    kubernetes_version TEXT,
    token_id BIGINT,
    holder TEXT NOT NULL,
    replica_id TEXT NOT NULL,
    epoch BIGINT NOT NULL
);
CREATE INDEX agent_connections_url_configuration ON agent_connections (url_configuration_id);

-- Assignments follow the configurations as they are written, so that no lease round has to
-- compare the two tables (which grows with the number of agents).
INSERT INTO agent_assignments (agent_id)
SELECT c.agent_id FROM agent_url_configurations c
ON CONFLICT DO NOTHING;
DELETE FROM agent_assignments a
WHERE NOT EXISTS (SELECT 1 FROM agent_url_configurations c WHERE c.agent_id = a.agent_id);

CREATE FUNCTION kas_gateway_assignment_follows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO agent_assignments (agent_id) VALUES (NEW.agent_id) ON CONFLICT DO NOTHING;
        RETURN NEW;
    END IF;
    DELETE FROM agent_assignments WHERE agent_id = OLD.agent_id;
    RETURN OLD;
END
$$;

CREATE TRIGGER agent_url_configurations_assignment
AFTER INSERT OR DELETE ON agent_url_configurations
FOR EACH ROW EXECUTE FUNCTION kas_gateway_assignment_follows();
