-- Chunks smaller than an object store's smallest part (5 MiB), staged until their run makes a
-- part: their bytes here rather than as objects of their own (a sixth of the object store's
-- CPU per byte on Swift: bench/README.md). The key is a staging key with the suffix ".pg";
-- the rows go with their upload (remove_staging) or, orphaned, with the sweep.
CREATE TABLE IF NOT EXISTS chunkserver_staged (
    key text PRIMARY KEY,
    file_id text NOT NULL,
    token text NOT NULL,
    created double precision NOT NULL,
    data bytea NOT NULL
);
-- Random bytes do not compress: kept out of line, uncompressed.
ALTER TABLE chunkserver_staged ALTER COLUMN data SET STORAGE EXTERNAL;
CREATE INDEX IF NOT EXISTS chunkserver_staged_upload ON chunkserver_staged (file_id, token);
