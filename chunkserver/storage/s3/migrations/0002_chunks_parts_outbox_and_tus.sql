-- Releases before numbered migrations added these one by one while their databases stayed
-- marked version 1: every statement here is idempotent, so that any such database comes up
-- to date, as a new one does.
ALTER TABLE chunkserver_uploads ADD COLUMN IF NOT EXISTS metadata text;
CREATE TABLE IF NOT EXISTS chunkserver_chunks (
    file_id text NOT NULL REFERENCES chunkserver_uploads ON DELETE CASCADE,
    token text NOT NULL,
    idx integer NOT NULL,
    length bigint NOT NULL,
    crc bigint NOT NULL,
    etag text,
    staging_key text,
    PRIMARY KEY (file_id, token, idx)
);
DROP FUNCTION IF EXISTS chunkserver_record_chunk(text, text, integer, bigint, bigint, text,
    text, bigint, double precision);
CREATE OR REPLACE FUNCTION chunkserver_record_chunk(
    p_file_id text, p_token text, p_idx integer, p_length bigint, p_crc bigint, p_etag text,
    p_staging_key text, p_learned_chunk_size bigint, p_now double precision,
    p_run_first integer, p_run_last integer)
RETURNS TABLE (o_upload json, o_replaced text, o_stored bigint, o_run_stored bigint) AS $$
DECLARE
    u chunkserver_uploads%ROWTYPE;
BEGIN
    SELECT * INTO u FROM chunkserver_uploads WHERE file_id = p_file_id FOR UPDATE;
    IF NOT FOUND OR u.token <> p_token THEN
        RETURN QUERY SELECT NULL::json, NULL::text, 0::bigint, 0::bigint;
        RETURN;
    END IF;
    IF u.status <> 'uploading' THEN
        RETURN QUERY SELECT row_to_json(u), NULL::text, 0::bigint, 0::bigint;
        RETURN;
    END IF;
    SELECT c.staging_key INTO o_replaced FROM chunkserver_chunks c
        WHERE c.file_id = p_file_id AND c.token = p_token AND c.idx = p_idx;
    INSERT INTO chunkserver_chunks AS c (file_id, token, idx, length, crc, etag, staging_key)
        VALUES (p_file_id, p_token, p_idx, p_length, p_crc, p_etag, p_staging_key)
        ON CONFLICT (file_id, token, idx) DO UPDATE SET length = p_length, crc = p_crc,
            etag = p_etag, staging_key = p_staging_key;
    UPDATE chunkserver_uploads SET last_activity = p_now,
            chunk_size = COALESCE(chunk_size, p_learned_chunk_size)
        WHERE file_id = p_file_id
        RETURNING * INTO u;
    RETURN QUERY SELECT row_to_json(u), o_replaced,
        (SELECT count(*) FROM chunkserver_chunks c
         WHERE c.file_id = p_file_id AND c.token = p_token),
        (SELECT count(*) FROM chunkserver_chunks c
         WHERE c.file_id = p_file_id AND c.token = p_token
           AND c.idx BETWEEN p_run_first AND p_run_last);
END
$$ LANGUAGE plpgsql;
CREATE TABLE IF NOT EXISTS chunkserver_outbox (
    id text PRIMARY KEY,
    event text NOT NULL,
    due double precision NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    claimed_until double precision NOT NULL DEFAULT 0
);
ALTER TABLE chunkserver_uploads ADD COLUMN IF NOT EXISTS protocol text NOT NULL DEFAULT 'chunks';
ALTER TABLE chunkserver_uploads ADD COLUMN IF NOT EXISTS concat text;
ALTER TABLE chunkserver_uploads ADD COLUMN IF NOT EXISTS stream_offset bigint;
ALTER TABLE chunkserver_uploads ADD COLUMN IF NOT EXISTS stream_crc bigint;
ALTER TABLE chunkserver_uploads ADD COLUMN IF NOT EXISTS stream_tail text;
ALTER TABLE chunkserver_uploads ADD COLUMN IF NOT EXISTS stream_writer text;
ALTER TABLE chunkserver_uploads ADD COLUMN IF NOT EXISTS stream_writer_until double precision;
-- Chunk requests that began receiving into the upload (see UploadState.join).
ALTER TABLE chunkserver_uploads ADD COLUMN IF NOT EXISTS receivers integer NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS chunkserver_outbox_due ON chunkserver_outbox (due);
CREATE TABLE IF NOT EXISTS chunkserver_parts (
    file_id text NOT NULL REFERENCES chunkserver_uploads ON DELETE CASCADE,
    token text NOT NULL,
    part_number integer NOT NULL,
    first_idx integer NOT NULL,
    last_idx integer NOT NULL,
    sources text NOT NULL DEFAULT '',
    etag text,
    PRIMARY KEY (file_id, token, part_number)
);
