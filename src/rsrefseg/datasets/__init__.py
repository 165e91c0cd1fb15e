"""Dataset readers, the synthetic generator, Parquet shards and the Ray Data pipeline.

    triplet.py     Triplet (id, phrase, split + lazy image/mask loaders), Issue, DatasetError
    refsegrs.py    read_refsegrs(root)     RefSegRS as distributed (also the synthetic layout)
    rrsisd.py      read_rrsisd(root)       RRSIS-D (refs(unc).p + instances.json + JPEGImages)
    fiftyone.py    read_fiftyone(root)     a FiftyOne export of RefSegRS, without fiftyone
    synthetic.py   generate(out_dir, size, seed)   the built-in synthetic set
    prepare.py     prepare_dataset(fmt, root, out), load_manifest(path)
    pipeline.py    read_split, preprocess, iter_batches (Ray Data; imports ray)

Import from the submodules; this package imports nothing on its own, so that `prepare` does not
pay for importing Ray.
"""
