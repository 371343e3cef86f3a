"""The published index format in one place: the layout of an index root (versions, CURRENT), the
SQLite metadata schema, the typed manifest, and the reader the server and the builder's checks
share. The builder writes through it; the server reads through it."""
