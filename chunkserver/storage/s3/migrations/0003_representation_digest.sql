-- The IETF draft's Repr-Digest, kept from whichever request of an upload carries it and
-- checked when the upload completes (any host may complete it).
ALTER TABLE chunkserver_uploads ADD COLUMN IF NOT EXISTS repr_sha256 text;
