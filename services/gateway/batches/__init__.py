"""OpenAI's Files and Batches API on the mesh: files in object storage, batches and their lines in the mesh's
database, lines run by every gateway replica at batch priority under leases."""
