"""One report per model: merge an analyze run and sweep runs of the same model into one results document."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from fp8probe.report.schema import ResultsError, validate_results, weight_shapes
from fp8probe.report.verdict import inputs_text, model_mode

# Metadata blocks that are per-run dictionaries: merged key by key (the first document's entry wins).
_DICT_META = ("rules", "recommendations", "formats")
# Tables every run of the model carries alike (each capture counts the same GEMMs): the base's copy is kept.
_SHARED_TABLES = ("coverage",)
# Tables whose rows each run adds to: analyze's per-strategy recommendation rows and the sweeps'
# model-wide block size / threshold rows (column ``kind`` tells them apart).
_CONCAT_TABLES = ("recommendation",)
# Tables of the same checkpoint's entries in each run: the union by the column named (weights-only runs list the
# tensors they skipped; two runs with other --layers / --include-embeddings skip other ones).
_UNION_TABLES = {"skipped": "key"}


def merge_results(docs: Sequence[Mapping], sources: Sequence[str] | None = None) -> dict:
    """Merge results documents of ONE model (an analyze run plus sweep runs, or sweeps alone).

    The analyze document (else the first) is the base: its metadata and kind are kept, every other
    document adds its tables, rules, recommendations and formats; ``layers`` is the union in the
    base's order then each document's own; ``metadata.merged_kinds`` lists the kinds and
    ``metadata.merged_from`` the sources; ``metadata.inputs_differ`` ("source: inputs" per document) when the
    runs measured other inputs, which the report and the command then say. Raises ResultsError (a ValueError,
    one line) when a document is not results, when two describe different models, or when two carry the same table
    (e.g. two analyze runs: merge one analyze run with its sweeps).
    """
    if not docs:
        raise ResultsError("expected at least one results document, got none")
    names = list(sources) if sources is not None else [f"results #{i + 1}" for i in range(len(docs))]
    if len(names) != len(docs):
        raise ValueError(f"expected one source name per document ({len(docs)}), got {len(names)}")
    for doc, name in zip(docs, names):
        validate_results(doc, name)
    order = sorted(range(len(docs)), key=lambda i: docs[i]["kind"] != "analyze")  # stable: analyze first
    base_i = order[0]
    base = docs[base_i]
    model = base["metadata"].get("model")
    merged_meta = dict(base["metadata"])
    for key in _DICT_META:
        merged_meta[key] = dict(base["metadata"].get(key) or {})
    tables = {name: list(rows) for name, rows in base["tables"].items()}
    owner = {name: base_i for name in tables}
    layer_names = {r.get("layer") for r in tables.get("layers", [])}
    for i in order[1:]:
        doc, name = docs[i], names[i]
        other = doc["metadata"].get("model")
        if model is not None and other is not None and other != model:
            raise ResultsError(f"expected results of one model, got {model!r} ({names[base_i]}) and {other!r} ({name}): "
                               "merge runs of the same model only")
        modes = [(model_mode(d["metadata"]), n) for d, n in ((base, names[base_i]), (doc, name))
                 if model_mode(d["metadata"]) is not None]  # (weights only: no model run, no mode)
        if len({m for m, _ in modes}) > 1:
            raise ResultsError(f"expected runs of one model mode, got {modes[0][0]} mode ({modes[0][1]}) and "
                               f"{modes[1][0]} mode ({modes[1][1]}): merge runs made with the same --train-mode setting")
        # (every model saved as nasty.pt2 is "torch.export program nasty.pt2": another model's sweep merged in,
        # its layers mixed with the analyze run's, QA) The parameter count tells them apart where both runs have it;
        # without it, two runs with no layer in common are not taken for one model.
        counts = [(d["metadata"].get("parameters"), n) for d, n in ((base, names[base_i]), (doc, name))]
        if all(isinstance(c, int) and not isinstance(c, bool) for c, _ in counts) and counts[0][0] != counts[1][0]:
            raise ResultsError(f"expected results of one model, got {counts[0][0]:,} parameters ({counts[0][1]}) and "
                               f"{counts[1][0]:,} ({counts[1][1]}): merge runs of the same model only")
        theirs_layers = {r.get("layer") for r in doc["tables"].get("layers", [])}
        if (not all(isinstance(c, int) for c, _ in counts) and layer_names and theirs_layers
                and not layer_names & theirs_layers):
            raise ResultsError(f"expected results of one model, got no layer in common between {names[base_i]} and "
                               f"{name}: merge runs of the same model only")
        shapes = weight_shapes(tables.get("layers", []))
        differ = [(layer, shapes[layer], theirs) for layer, theirs in
                  weight_shapes(doc["tables"].get("layers", [])).items() if shapes.get(layer, theirs) != theirs]
        if differ:  # (two models saved under the same directory name have the same description)
            layer, a, b = differ[0]
            raise ResultsError(f"expected results of one model, got layer {layer} with weight {list(a)} in "
                               f"{names[base_i]} and {list(b)} in {name} ({len(differ)} layer(s) differ): merge runs "
                               "of the same model only")
        for tname, rows in doc["tables"].items():
            if tname == "layers":
                new = [r for r in rows if r.get("layer") not in layer_names]
                tables["layers"] += new
                layer_names |= {r.get("layer") for r in new}
                continue
            if tname in _SHARED_TABLES and tname in tables:
                continue
            if tname in _UNION_TABLES and tname in tables:  # (a weights-only analyze run and its sweep)
                key = _UNION_TABLES[tname]
                seen = {r.get(key) for r in tables[tname]}
                tables[tname] = tables[tname] + [r for r in rows if r.get(key) not in seen]
                continue
            if tname in _CONCAT_TABLES and tname in tables:
                tables[tname] = tables[tname] + list(rows)
                continue
            if tname in tables:
                first = owner[tname]
                same = docs[first]["kind"] == doc["kind"]
                raise ResultsError(f"{names[first]} and {name} both carry the table {tname!r} ("
                                   + (f"two {doc['kind']} runs): merge one analyze run with sweep runs, not two runs "
                                      "of the same kind" if same else
                                      f"kinds {docs[first]['kind']} and {doc['kind']}): merge one analyze run with "
                                      "its sweep runs, each of another kind"))
            tables[tname], owner[tname] = list(rows), i
        for key in _DICT_META:
            for k, v in (doc["metadata"].get(key) or {}).items():
                merged_meta[key].setdefault(k, v)
        for key, value in doc["metadata"].items():
            merged_meta.setdefault(key, value)  # e.g. a sweep's blocksizes / thresholds
    inputs = [(names[i], inputs_text(docs[i]["metadata"])) for i in order]
    if len({text for _, text in inputs if text}) > 1:  # (a weights-only run has no inputs to differ)
        merged_meta["inputs_differ"] = [f"{name}: {text or 'none'}" for name, text in inputs]
    merged_meta["merged_kinds"] = [docs[i]["kind"] for i in order]
    merged_meta["merged_from"] = [names[i] for i in order]
    out = {key: value for key, value in base.items() if key not in ("metadata", "tables")}
    out.update({"metadata": merged_meta, "tables": tables})
    return out
