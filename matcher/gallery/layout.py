"""Where a gallery lives in its data folder: the store file and the snapshots folder."""

STORE_FILE = "gallery.sqlite3"
SNAPSHOT_DIR = "snapshots"  # snapshot folders, newest kept (snapshot.py); replicas read it
