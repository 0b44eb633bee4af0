-- Quotas (quotas.py): one request bucket per identity's namespace ("" for the anonymous
-- identity), its tokens and the database's time they were counted at.
CREATE TABLE IF NOT EXISTS chunkserver_request_buckets (
    namespace text PRIMARY KEY,
    tokens double precision NOT NULL,
    counted_at double precision NOT NULL,
    taken boolean NOT NULL DEFAULT true
);
-- An upload stopped by the application (a post-receive hook's answer): the detail its next
-- requests are refused with.
ALTER TABLE chunkserver_uploads ADD COLUMN IF NOT EXISTS stopped text;
-- Counting an identity's uploads in progress reads only the rows not completed.
CREATE INDEX IF NOT EXISTS chunkserver_uploads_in_progress ON chunkserver_uploads (file_id)
    WHERE status <> 'completed';
-- The identity an upload belongs to, by name (its namespace is in its file_id): for the
-- events no request causes (the sweep's post-expire), which say whose upload it was.
ALTER TABLE chunkserver_uploads ADD COLUMN IF NOT EXISTS owner text NOT NULL DEFAULT '';
