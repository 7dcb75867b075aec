-- The seed's table, for users who prefer to create it with psql.
-- eps creates it (and its own eps_* tables) by itself at start-up; running this first is harmless.
CREATE TABLE IF NOT EXISTS users_revenue (
    user_id VARCHAR(255) PRIMARY KEY,
    revenue NUMERIC NOT NULL
);
