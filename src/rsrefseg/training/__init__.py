"""What runs inside a training job: the Ray Train worker loop and the engine it drives
(worker, engine), what it reports (reporting, progress), how Ray Data feeds it (ingest), and the
sweep files that Tune expands into trials (sweep). The jobs in `rsrefseg.jobs` put these together."""
