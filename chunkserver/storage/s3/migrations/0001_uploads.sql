-- The uploads table: what every database marked version 1 has.
CREATE TABLE IF NOT EXISTS chunkserver_uploads (
    file_id text PRIMARY KEY,
    token text NOT NULL,
    filename text NOT NULL,
    total_chunks integer NOT NULL,
    total_size bigint,
    chunk_size bigint,
    chunk_size_declared boolean NOT NULL DEFAULT false,
    direct boolean,
    created_at double precision NOT NULL,
    last_activity double precision NOT NULL,
    status text NOT NULL DEFAULT 'uploading',
    claimed_at double precision,
    object_key text NOT NULL,
    s3_upload_id text NOT NULL,
    size bigint,
    crc64nvme text,
    sha256 text,
    completed_at double precision
);
CREATE INDEX IF NOT EXISTS chunkserver_uploads_status ON chunkserver_uploads (status);
