"""The seed document's naive FastAPI endpoint, as it sketches it: the bench's peer.

Each chunk is saved whole with `shutil.copyfileobj` from FastAPI's UploadFile (which spools it
to a temporary file first), counted by listing the folder, and merged by reading every chunk
back when the last arrives. Run: `python -m bench.fastapi_seed --port 0 --data-dir DIR`, with
`--variant async` for the same code as an `async def` endpoint (as most FastAPI upload
examples write it: the copy then runs on the event loop, not in FastAPI's thread pool).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
from pathlib import Path

import uvicorn
from fastapi import FastAPI, File, Form, HTTPException, UploadFile


def create_app(data_dir: Path, variant: str = "def") -> FastAPI:
    chunks_dir = data_dir / "chunks"
    uploads_dir = data_dir / "uploads"
    chunks_dir.mkdir(parents=True, exist_ok=True)
    uploads_dir.mkdir(parents=True, exist_ok=True)
    app = FastAPI()
    # The seed's sketch counts and merges with no lock: two last chunks at once would merge
    # twice and fail. One lock around that step is the least change that lets it be measured.
    merging = threading.Lock()

    def merge_chunks(file_id: str, filename: str, total_chunks: int) -> None:
        final_dir = uploads_dir / file_id
        final_dir.mkdir(exist_ok=True)
        with open(final_dir / filename, "wb") as out:
            for index in range(total_chunks):
                with open(chunks_dir / file_id / f"chunk_{index:06d}", "rb") as chunk:
                    shutil.copyfileobj(chunk, out)
        shutil.rmtree(chunks_dir / file_id)

    def store_chunk(
        file_id: str, chunk_index: int, total_chunks: int, filename: str, chunk: UploadFile
    ) -> dict[str, object]:
        try:
            file_chunks_dir = chunks_dir / file_id
            file_chunks_dir.mkdir(exist_ok=True)
            chunk_path = file_chunks_dir / f"chunk_{chunk_index:06d}"
            with open(chunk_path, "wb") as buffer:
                shutil.copyfileobj(chunk.file, buffer)
            with merging:
                if not file_chunks_dir.exists():  # merged by a request of the same chunk
                    uploaded_chunks, status = total_chunks, "completed"
                else:
                    uploaded_chunks = len(list(file_chunks_dir.glob("chunk_*")))
                    status = "uploading"
                    if uploaded_chunks == total_chunks:
                        merge_chunks(file_id, filename, total_chunks)
                        status = "completed"
        except Exception as e:
            raise HTTPException(status_code=500, detail=f"Chunk upload failed: {e}") from e
        return {
            "file_id": file_id,
            "filename": filename,
            "type": "file",
            "status": status,
            "uploaded_chunks": uploaded_chunks,
            "total_chunks": total_chunks,
        }

    if variant == "def":  # FastAPI runs it in its thread pool

        @app.post("/upload-chunk")
        def upload_chunk(
            file_id: str = Form(...),
            chunk_index: int = Form(...),
            total_chunks: int = Form(...),
            filename: str = Form(...),
            chunk: UploadFile = File(...),  # noqa: B008 - FastAPI's own idiom
        ) -> dict[str, object]:
            return store_chunk(file_id, chunk_index, total_chunks, filename, chunk)

    else:  # `async def`, as most FastAPI upload examples write it: run on the event loop

        @app.post("/upload-chunk")
        async def upload_chunk_async(
            file_id: str = Form(...),
            chunk_index: int = Form(...),
            total_chunks: int = Form(...),
            filename: str = Form(...),
            chunk: UploadFile = File(...),  # noqa: B008 - FastAPI's own idiom
        ) -> dict[str, object]:
            return store_chunk(file_id, chunk_index, total_chunks, filename, chunk)

    @app.delete("/uploads/{file_id}", status_code=204)
    def delete(file_id: str) -> None:
        shutil.rmtree(uploads_dir / file_id, ignore_errors=True)
        shutil.rmtree(chunks_dir / file_id, ignore_errors=True)

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--variant", choices=("def", "async"), default="def")
    args = parser.parse_args()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    print(f"fastapi listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(
        create_app(args.data_dir, args.variant), log_level="warning", access_log=False
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
