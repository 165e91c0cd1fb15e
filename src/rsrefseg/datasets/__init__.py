"""Dataset readers, the synthetic generator, Parquet shards and the Ray Data pipeline.

    triplet.py     Triplet (id, phrase, split, category + lazy image/mask loaders), Issue, DatasetError
    imagefiles.py  image/mask file decoding, the mask policy
    shard_codec.py how the shards store pixels (raw, Parquet-compressed; masks bit-packed)
    categories.py  phrase_category(phrase)   the category rule for phrases without one
    refsegrs.py    read_refsegrs(root)     RefSegRS as distributed (also the synthetic layout)
    rrsisd.py      read_rrsisd(root)       RRSIS-D as downloaded (rrsisd/refs(unc).p, instances.json, images/)
    fiftyone.py    read_fiftyone(root)     a FiftyOne export of RefSegRS, without fiftyone
    synthetic.py   generate(out_dir, size, seed), read_synthetic(root)   the built-in synthetic set
    prepare.py     prepare_dataset(fmt, root, out), load_manifest(path)
    pipeline.py    read_split, preprocess, iter_batches (Ray Data; imports ray): pixels as stored

Import from the submodules; this package imports nothing on its own, so that `prepare` does not
pay for importing Ray.
"""
