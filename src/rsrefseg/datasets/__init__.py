"""Dataset readers, the synthetic generator, Parquet shards and the Ray Data pipeline.

    triplet.py     Triplet (id, phrase, split, category + lazy image/mask loaders), Issue, DatasetError
    imagefiles.py  image/mask file decoding, the mask policy
    shard_codec.py how the shards store pixels (JPEG/PNG as shipped, else raw; masks bit-packed)
    categories.py  phrase_category(phrase)   the category rule for phrases without one
    refsegrs.py    read_refsegrs(root)     RefSegRS as distributed (also the synthetic layout)
    refer.py       read_refer(layout, rules)   the REFER layout (refs pickle, instances.json, RLE/polygon masks)
    rrsisd.py      read_rrsisd(root)       RRSIS-D as downloaded (rrsisd/refs(unc).p, instances.json, images/)
    nwpu_refer.py  read_nwpu_refer(root)   NWPU-Refer (new_refs(unc).p, new_instances.json, image/image/)
    remotesam.py   read_remotesam(root)    RemoteSAM-270K (refs(unc).p, instances.json, JPEGImages/)
    risbench.py    read_risbench(root)     RISBench (img_rgb/, mask/, output_phrase_*.txt)
    language.py    is_non_english(phrase)  Chinese or mixed expressions, kept or left out, counted
    fiftyone.py    read_fiftyone(root)     a FiftyOne export of RefSegRS, without fiftyone
    synthetic.py   generate(out_dir, size, seed), read_synthetic(root)   the built-in synthetic set
    prepare.py     prepare_dataset(fmt, root, out), load_manifest(path)
    resume.py      a killed or interrupted prepare's staging, resumed: fingerprint, journal, kept shards
    pipeline.py    read_split, preprocess, iter_batches (Ray Data; imports ray): pixels as stored

Import from the submodules; this package imports nothing on its own, so that `prepare` does not
pay for importing Ray.
"""
