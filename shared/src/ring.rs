//! PROTOCOL of the shared-memory batch ring (filled in by the ring issue).
