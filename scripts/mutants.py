"""Break the code on purpose, one piece at a time, and check that a test goes red.

Each mutant is a one-line change to a source file (a dropped term, a swapped argument, a wrong
order). For each, the repository is copied to a temporary folder, the change applied there, and
the tests that should catch it run there; the working tree is never touched.

    .venv/bin/python scripts/mutants.py            # every mutant
    .venv/bin/python scripts/mutants.py 1 4        # some of them, by number

Prints one line per mutant: CAUGHT (a test failed, named) or MISSED; exits 1 if any is missed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    """A deliberate bug: replace ``old`` by ``new`` in ``path``; ``tests`` should catch it."""

    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    also: tuple[tuple[str, str], ...] = ()  # more (old, new) edits in the same file


ORACLES = ("tests/test_deflect_oracles.py",)
COMPETITORS = ("tests/test_competitors.py",)
MATRIX = ("tests/test_tuner_matrix.py",)
INPUTS = "tests/test_classification_inputs.py::"
MUTANTS = [
    Mutant("uAtt without the spectral keys K_A", "deflect/tuners/deflect/uatt.py",
           "q_p + q_a, k_p + k_a, v_p + v_a", "q_p + q_a, k_p, v_p + v_a", ORACLES),
    Mutant("norm matching to a constant", "deflect/tuners/deflect/upe.py",
           "tokens = tokens * norms[:, num_prefix:] / own", "tokens = tokens * 1.0 / own",
           ORACLES),
    Mutant("spectral CLS from the first patch token", "deflect/tuners/deflect/upe.py",
           "cls = tokens.mean(dim=1, keepdim=True)", "cls = tokens[:, :1]", ORACLES),
    Mutant("poly schedule ignores power", "deflect/engine/scheduler.py",
           "shape = (1 - progress) ** power", "shape = 1 - progress", ("tests/test_engine.py",)),
    Mutant("soft-deflection loss without the division by |d_uAtt|",
           "deflect/tuners/deflect/deflection.py",
           "((n_uatt - n_rgb).abs() / n_uatt.clamp_min(eps)).mean()",
           "((n_uatt - n_rgb).abs()).mean()", ORACLES),
    Mutant("hard deflection keeps the uAtt norm", "deflect/tuners/deflect/deflection.py",
           'if mode == "hard":', 'if mode == "hard-off":', ORACLES),
    Mutant("invalid pixels enter the statistics", "deflect/tuners/deflect/upe.py",
           "features, self.patch_size, self.stats, valid, k,",
           "features, self.patch_size, self.stats, None, k,", ORACLES),
    Mutant("indices from the normalised bands, not reflectance", "deflect/tuners/deflect/upe.py",
           "reflectance = torch.where(valid, stored / self.reflectance_scale, zero)",
           "reflectance = torch.where(valid, x, zero)", ORACLES),
    Mutant("quantile interpolates to the wrong neighbour", "deflect/tuners/deflect/upe.py",
           "hi = torch.minimum(lo + 1, last)", "hi = torch.minimum(lo + 2, last)", ORACLES),
    Mutant("sqrt_2d temperature ignored", "deflect/tuners/deflect/uatt.py",
           "scale = (2 * head_dim) ** -0.5", "scale = rgb_scale", ORACLES),
    Mutant("learned CLS not norm-matched", "deflect/tuners/deflect/upe.py",
           "cls = cls * norms[:, :num_prefix] / self.cls_token.norm().clamp_min(self.eps)",
           "cls = cls", ORACLES),
    Mutant("CLS as the mean before norm matching, then matched (the old order)",
           "deflect/tuners/deflect/upe.py",
           "        if self.norm_match:\n            own = tokens.norm",
           "        before = tokens.mean(dim=1, keepdim=True)\n        if self.norm_match:\n"
           "            own = tokens.norm", ORACLES,
           also=(("cls = tokens.mean(dim=1, keepdim=True).expand(b, num_prefix, d)",
                  "cls = (before * norms[:, :1] / before.norm(dim=-1, keepdim=True))"
                  ".expand(b, num_prefix, d)"),)),
    Mutant("index statistics in the model's dtype (fp16 under .half())",
           "deflect/tuners/deflect/upe.py",
           "torch.tensor(values, dtype=torch.float32, device=x.device)",
           "torch.tensor(values, dtype=self.projection.weight.dtype, device=x.device)",
           ("tests/test_deflect.py",)),
    Mutant("learned CLS starts at zero", "deflect/tuners/deflect/upe.py",
           "torch.randn(embed_dim) / embed_dim**0.5", "torch.zeros(embed_dim)",
           ("tests/test_deflect.py",)),
    Mutant("selection tuner: disable_adapter keeps the tuned values", "deflect/tuners/base.py",
           "self._swap_in(self.active_adapter if enabled else None)", "pass",
           ("tests/test_tuner_matrix.py",)),
    Mutant("selection tuner: save writes zeros", "deflect/tuners/base.py",
           "out[strip_adapter_name(name, self.prefixes, adapter_name)] = value",
           "out[strip_adapter_name(name, self.prefixes, adapter_name)] = value * 0",
           ("tests/test_tuner_matrix.py",)),
    Mutant("unload leaves the tuned base values", "deflect/tuners/base.py",
           "                if name not in keep:\n                    self._tensor(name).copy_(value)",
           "                if name not in keep:\n                    pass",
           ("tests/test_tuner_matrix.py",)),
    Mutant("precision and recall swapped", "deflect/tasks/confusion.py",
           "precision = ratio(tp, predicted)", "precision = ratio(tp, support)",
           ("tests/test_engine.py",)),
    Mutant("training crops pad with 0, not NaN", "datasets/transforms.py",
           "(0, pad_w, 0, pad_h), value=torch.nan)", "(0, pad_w, 0, pad_h), value=0.0)",
           ("tests/test_datasets.py",)),
    Mutant("sliding window pads with 0, not NaN", "deflect/engine/inference.py",
           "(0, pad_w, 0, pad_h), value=torch.nan)", "(0, pad_w, 0, pad_h), value=0.0)",
           ("tests/test_engine.py",)),
    Mutant("pretrained bands fed in file order, not by name", "deflect/encoders/base.py",
           "return fill_invalid(x.index_select(1, self.pretrained_index))",
           "return fill_invalid(x[:, : len(self.pretrained_index)])",
           ("tests/test_encoders.py",)),
    Mutant("auto indices filtered by application domain", "deflect/tuners/deflect/indices.py",
           "return sorted(n for n in spyndex.indices if index_symbols(n) <= available)",
           "return sorted(n for n in spyndex.indices if index_symbols(n) <= available and "
           "spyndex.indices[n].application_domain != 'snow')", ("tests/test_deflect.py",)),
    Mutant("LoRA without its alpha / rank scale", "deflect/tuners/lora/layer.py",
           "self.scaling[adapter_name] = float(scaling)",
           "self.scaling[adapter_name] = 1.0", COMPETITORS),
    Mutant("SLR merge leaves the bias unscaled", "deflect/tuners/lora/layer.py",
           "base.bias.copy_((base.bias.float() * s_out).to(base.bias.dtype))",
           "base.bias.copy_(base.bias)", COMPETITORS),
    Mutant("SLR scales the output before the low-rank branch is added",
           "deflect/tuners/lora/layer.py",
           "        out = self.base_layer(x)\n",
           "        out = self.base_layer(x) * (self.lora_scale_out[name].weight if scaled else 1)\n",
           COMPETITORS, also=(("out = out * self.lora_scale_out[name].weight", "pass"),)),
    Mutant("unmerge subtracts the update instead of restoring the weights",
           "deflect/tuners/lora/layer.py",
           "getattr(self.base_layer, name).copy_(value)",
           "getattr(self.base_layer, name).sub_(self.delta_weight(self.merged)) if name == "
           "'weight' else None", COMPETITORS),
    Mutant("repeat band strategy without the 3/C rescaling", "deflect/tuners/bands.py",
           "out = weight[:, kernel_sources(bands, pretrained_bands)] * (p / c)",
           "out = weight[:, kernel_sources(bands, pretrained_bands)]", MATRIX),
    Mutant("repeat tiles by channel position, not band name", "deflect/tuners/bands.py",
           "            sources.append(pretrained_bands.index(band))",
           "            sources.append(len(sources) % len(pretrained_bands))", MATRIX),
    Mutant("rank auto rounds down", "deflect/tuners/lora/model.py",
           "(max(1, best - 1), best, best + 1)", "(max(1, best - 1),)", COMPETITORS),
    Mutant("ablation table with the population std", "scripts/ablation_table.py",
           "{100 * statistics.stdev(values):.2f}", "{100 * statistics.pstdev(values):.2f}",
           ("tests/test_ablation.py",)),
    Mutant("ablation table drops failed jobs", "scripts/ablation_table.py",
           'if run.status == "failed":', 'if run.status == "failed" and False:',
           ("tests/test_ablation.py",)),
    Mutant("MADOS coarse bands tiled, not upsampled", "datasets/mados.py",
           "rows = np.arange(shape[0]) * h // shape[0]", "rows = np.arange(shape[0]) % h",
           ("tests/test_benchmark_datasets.py",)),
    Mutant("MADOS mask without the -1 offset", "datasets/mados.py",
           "label_offset: ClassVar[int] = 1", "label_offset: ClassVar[int] = 0",
           ("tests/test_benchmark_datasets.py",)),
    Mutant("HLS train/val split overlaps", "datasets/hls_burn_scars.py",
           "if (i in val) == (split == \"val\")", "if (i in val) or split == \"train\"",
           ("tests/test_benchmark_datasets.py",)),
    Mutant("DINO checkpoints read the student, not the teacher", "deflect/encoders/checkpoint.py",
           '"teacher", "student"', '"student", "teacher"', ("tests/test_encoders.py",)),
    Mutant("Scale-MAE embeds rows first, columns second", "deflect/encoders/scale_mae.py",
           "[sincos_1d(dim // 2, j * res), sincos_1d(dim // 2, i * res)]",
           "[sincos_1d(dim // 2, i * res), sincos_1d(dim // 2, j * res)]",
           ("tests/test_encoders.py",)),
    Mutant("Scale-MAE ignores the per-sample GSD", "deflect/encoders/scale_mae.py",
           "res = self._res if self._res is not None else", "res =", ("tests/test_encoders.py",)),
    Mutant("median-frequency weights from the mean frequency", "deflect/tasks/weights.py",
           "return [median / f for f in frequencies]",
           "return [sum(frequencies) / n / f for f in frequencies]",
           ("tests/test_benchmark_datasets.py",)),
    Mutant("limited_label cuts every split", "datasets/base.py",
           'if split == "train" and limited_label is not None', "if limited_label is not None",
           ("tests/test_benchmark_datasets.py",)),
    Mutant("Prithvi's table encodes rows where it should encode columns", "deflect/encoders/prithvi.py",
           "[sincos_1d(spatial, j), sincos_1d(spatial, i), sincos_1d(temporal, t)]",
           "[sincos_1d(spatial, i), sincos_1d(spatial, j), sincos_1d(temporal, t)]",
           ("tests/test_prithvi.py",)),
    Mutant("Prithvi's maps mix frames and channels", "deflect/encoders/prithvi.py",
           "patches.permute(0, 1, 4, 2, 3)", "patches.permute(0, 4, 1, 2, 3)",
           ("tests/test_prithvi.py",)),
    Mutant("Prithvi's location embedding reads (lon, lat)", "deflect/encoders/prithvi.py",
           "coords.reshape(b, 1, 2))", "coords.reshape(b, 1, 2).flip(-1))",
           ("tests/test_prithvi.py",)),
    Mutant("HLS chip location at its corner, not its centre", "datasets/base.py",
           "@ (src.width / 2, src.height / 2)", "@ (0, 0)", ("tests/test_benchmark_datasets.py",)),
    Mutant("band statistics combine files without the between-file term", "datasets/folder.py",
           "m2 = m2 + m2_f + delta**2 * count * n_f / safe", "m2 = m2 + m2_f",
           ("tests/test_folder_dataset.py",)),
    Mutant("band statistics count no-data pixels", "datasets/folder.py",
           "valid &= raw != nodata", "valid &= True", ("tests/test_folder_dataset.py",)),
    Mutant("stale statistics cache kept after its files changed", "datasets/folder.py",
           "for k in key} == key:", "for k in key} is not None:", ("tests/test_folder_dataset.py",)),
    Mutant("class ids outside the class list read as ignored", "datasets/folder.py",
           "and v != ignore and not 0 <= v < offset", "and v != ignore and False",
           ("tests/test_folder_dataset.py",)),
    Mutant("fast fusion shifts the kernel taps the wrong way", "segmentors/upernet.py",
           "interpolation_matrix(size[0], small[0], k - 1)",
           "interpolation_matrix(size[0], small[0], 1 - k)",
           ("tests/test_segmentor.py",)),
    Mutant("chunked fusion skips the last chunk of samples", "segmentors/upernet.py",
           "for start in range(0, x.shape[0], step):", "for start in range(0, x.shape[0] - 1, step):",
           ("tests/test_segmentor.py",)),
    Mutant("folded classifier dropout drops the classifier's bias", "segmentors/upernet.py",
           "return logits if bias is None else logits + bias.view(1, -1, 1, 1).to(logits.dtype)",
           "return logits", ("tests/test_segmentor.py",)),
    Mutant("mask-keeping ReLU passes the gradient at zero", "segmentors/upernet.py",
           "ctx.save_for_backward(out > 0)", "ctx.save_for_backward(out >= 0)",
           ("tests/test_segmentor.py",)),
    Mutant("whole-scene prediction sums overlapping tiles without averaging", "deflect/engine/predict.py",
           "logits /= torch.from_numpy(counts).to(predictor.device)", "logits /= 1",
           ("tests/test_predict.py",)),
    Mutant("whole-scene prediction keeps the bands in file order", "deflect/engine/predict.py",
           "indexes = select_bands(",
           "indexes = (lambda *a, **k: list(range(1, len(predictor.spec.bands) + 1)))(",
           ("tests/test_predict.py",)),
    Mutant("folded laterals drop the transposed convolution's bias", "segmentors/segmentor.py",
           "bias = w_lat @ convt.bias if convt.bias is not None else None", "bias = None",
           ("tests/test_segmentor.py",)),
    Mutant("the tuned allocator still maps large blocks afresh", "deflect/engine/runtime.py",
           "(M_MMAP_MAX, 0)", "(M_MMAP_MAX, 65536)", ("tests/test_runtime.py",)),
    Mutant("matmul_precision is ignored", "deflect/engine/runtime.py",
           "torch.set_float32_matmul_precision(precision)",
           "torch.set_float32_matmul_precision(\"highest\")", ("tests/test_runtime.py",)),
    Mutant("recomputed blocks draw fresh dropout masks", "deflect/encoders/recompute.py",
           "return checkpoint(forward, *args, use_reentrant=False, **kwargs)",
           "return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, "
           "**kwargs)", ("tests/test_encoders.py",)),
    Mutant("DEFLECT's target blocks never recompute", "deflect/tuners/deflect/layer.py",
           "if self.checkpoint_activations and torch.is_grad_enabled():",
           "if False:", MATRIX),
    Mutant("activation_checkpointing=true is ignored", "deflect/engine/build.py",
           "encoder.set_activation_checkpointing(True)", "pass", ("tests/test_configs.py",)),
    Mutant("a crop without a labelled pixel takes the cross-entropy's empty mean",
           "deflect/tasks/segmentation/task.py",
           'return bool((batch["mask"] != data.ignore_index).any())', "return True",
           ("tests/test_run.py::test_batches_without_a_labelled_pixel_train_on_without_nan",)),
    Mutant("matmul_precision=highest leaves cuDNN convolutions in TF32", "deflect/engine/runtime.py",
           'torch.backends.cudnn.allow_tf32 = precision != "highest"', "pass",
           ("tests/test_runtime.py",)),
    Mutant("training accepts one image per step", "deflect/tasks/segmentation/task.py",
           "    min_batch_size = 2\n", "    min_batch_size = 1\n", ("tests/test_engine.py",)),
    Mutant("embedding deflection keeps the length of the token entering the block",
           "deflect/tuners/deflect/deflection.py",
           "target = (x + delta_rgb).norm(dim=-1, keepdim=True)",
           "target = x.norm(dim=-1, keepdim=True)", ORACLES + MATRIX),
    Mutant("embedding deflection turns the update, not the token", "deflect/tuners/deflect/layer.py",
           'if uatt.deflection == "embedding":  # the token', 'if False:  # the token', ORACLES),
    Mutant("spectral_kernel's kernel does not train", "deflect/tuners/spectral_kernel/config.py",
           "        self.train_patch_embed = True\n", "        self.train_patch_embed = False\n",
           ("tests/test_tuners.py::test_spectral_kernel_trains_only_an_all_band_kernel_that_starts_as_the_pretrained_one",)),
    Mutant("occlusion puts zeros in place of a feature's training mean", "deflect/engine/probes.py",
           'upe.occlude_features = {occlusion.index: float(means["features"][occlusion.index])}',
           "upe.occlude_features = {occlusion.index: 0.0}",
           ("tests/test_explain.py::test_upe_features_are_occluded_with_their_training_mean",)),
    Mutant("deflection angle measured against the wrong update", "deflect/engine/probes.py",
           "cosine_similarity(delta_uatt[:, p:], delta_rgb[:, p:], dim=-1)",
           "cosine_similarity(delta_uatt[:, p:], delta_uatt[:, p:], dim=-1)",
           ("tests/test_explain.py::test_deflection_statistics_equal_numpy_on_the_same_tensors",)),
    Mutant("cross-sensor bands mapped by position, not by band and wavelength", "deflect/data.py",
           "out.append((band, given[given_canon.index(match)], centre, g_centre))",
           "out.append((band, given[len(out)], centre, g_centre))",
           ("tests/test_predict.py::test_a_landsat8_scene_is_mapped_to_the_trained_bands_and_converted",)),
    # Issue 19: classification.
    Mutant("multi-label macro F1 averaged over labels absent from the split",
           "deflect/tasks/classification/task.py",
           "return float(values[present].mean()) if present.any() else float(\"nan\")",
           "return float(values.mean())",
           ("tests/test_classification.py::test_multi_label_metrics_threshold_probabilities_and_equal_hand_counts",)),
    Mutant("multi-label threshold applied to logits, not probabilities",
           "deflect/tasks/classification/task.py",
           "decisions = (probabilities >= self.threshold).int()",
           "decisions = (output.float() >= self.threshold).int()",
           ("tests/test_classification.py::test_multi_label_metrics_threshold_probabilities_and_equal_hand_counts",)),
    Mutant("the resize lets invalid pixels spread", "datasets/transforms.py",
           "values = torch.where(valid, image, torch.zeros((), dtype=image.dtype))",
           "values = image",
           ("tests/test_classification.py::test_the_resize_keeps_invalid_pixels_out_of_valid_ones",)),
    Mutant("the partition file ignored (always the default)", "datasets/geobench.py",
           'path = self.root / f"{partition}_partition.json"',
           'path = self.root / "default_partition.json"',
           ("tests/test_classification.py::test_geobench_samples_labels_partitions_and_statistics",)),
    Mutant("pooled features taken from the first patch token, not CLS", "segmentors/classifier.py",
           "cls = tokens[:, 0]  # (B, D)", "cls = tokens[:, 1]  # (B, D)",
           ("tests/test_classification.py::test_the_head_pools_the_cls_token_the_patch_mean_or_both",)),
    # Issue 18: silent wrong answers and lost work, one mutant per case.
    Mutant("(18.1) an encoder checkpoint covering none of the encoder is accepted",
           "deflect/encoders/checkpoint.py", "if coverage < min_coverage:", "if False:",
           ("tests/test_encoders.py::test_a_checkpoint_that_covers_too_little_of_the_encoder_is_refused",)),
    Mutant("(18.2) a run folder is not locked", "deflect/engine/workdir.py",
           "            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)",
           "            pass", ("tests/test_run_folder.py::test_two_runs_with_one_work_dir_the_second_refuses",)),
    Mutant("(18.3) resume=true trains a finished run again", "deflect/engine/workdir.py",
           "    return (folder / FINISHED_MARKER).is_file()", "    return False",
           ("tests/test_run.py::test_multirun_gives_each_job_a_folder_in_one_sweep_folder",)),
    Mutant("(18.3) changed settings on resume only warn", "deflect/engine/workdir.py",
           'if changes and not cfg.get("resume_allow_changes", False):', "if False:",
           ("tests/test_run.py::test_resume_after_a_stop_ends_where_an_uninterrupted_run_ends",)),
    Mutant("(18.4) every file read in the first file's band order", "datasets/folder.py",
           "order = self._file_orders.get(path, self.available_bands)",
           "order = self.available_bands",
           ("tests/test_folder_dataset.py::test_each_file_is_read_by_its_own_band_names_not_by_position",)),
    Mutant("(18.5) the files' declared no-data value ignored", "datasets/folder.py",
           "        if declared:\n            value, path", "        if False:\n            value, path",
           ("tests/test_folder_dataset.py::test_the_files_no_data_value_is_honoured_unless_the_config_says_otherwise",)),
    Mutant("(18.6) implausible reflectance accepted", "datasets/base.py",
           "        if too_high or too_low:", "        if False:",
           ("tests/test_datasets.py::test_a_wrong_reflectance_scale_is_refused_with_the_likely_one",)),
    Mutant("(18.7) evaluation scores pixels without a valid band", "datasets/base.py",
           "        mask[np.isnan(image).all(axis=0)] = self.ignore_index\n", "",
           ("tests/test_predict.py::test_evaluation_and_whole_scene_prediction_agree_where_no_band_has_data",)),
    Mutant("(18.8) stale checkpoint temporaries kept", "deflect/engine/report.py",
           "        remove_stale_temporaries(work_dir)  # this process", "        pass  # this process",
           ("tests/test_run.py::test_resume_after_a_stop_ends_where_an_uninterrupted_run_ends",)),
    Mutant("(18.9) last.pt kept when the run finishes", "deflect/engine/report.py",
           "        if not keep_last and last.is_file():", "        if False:",
           ("tests/test_run.py::test_run_folder_holds_config_logs_metrics_checkpoints",)),
    Mutant("(18.6) the reflectance-scale check not run when building a dataset",
           "deflect/engine/build.py", '    if bool(cfg.get("check_reflectance_scale", True)):',
           "    if False:",
           ("tests/test_run.py::test_a_wrong_reflectance_scale_stops_training_and_evaluation",)),
    Mutant("(18.12) torch's full-disk error not traced to its ENOSPC cause", "deflect/io.py",
           "        error = error.__cause__ or error.__context__", "        error = None",
           ("tests/test_run_folder.py::test_torch_s_full_disk_error_is_reported_as_one",)),
    Mutant("(18.19) a saved target resolved through a framework module's import is taken",
           "deflect/engine/run_config.py",
           '    if not (module + ".").startswith(ALLOWED_TARGETS):', "    if False:",
           ("tests/test_run_folder.py::test_a_saved_config_may_not_instantiate_anything_outside_the_framework",)),
    Mutant("(18.c) unread top-level keys not said in a sweep's jobs", "run.py",
           "            warn_unread(check_run_config(cfg))", "            check_run_config(cfg)",
           ("tests/test_run.py::test_multirun_gives_each_job_a_folder_in_one_sweep_folder",)),
    # issue 26 (predict)
    Mutant("(26.1) predict.py tiles scenes at img_size, not at the training chips' size",
           "deflect/engine/predict.py",
           "    th, tw = predictor.tile or (predictor.window, predictor.window)\n    sy, sx",
           "    th, tw = (predictor.window, predictor.window)\n    sy, sx",
           ("tests/test_classification.py::test_a_classification_run_maps_a_scene_one_pixel_per_tile",)),
    Mutant("(26.1) predict.py pads a chip to img_size instead of evaluation's resize",
           "deflect/engine/predict.py",
           "build_classification_transform(spec, False, predictor.window, task.input)",
           'build_classification_transform(spec, False, predictor.window, "center_crop")',
           ("tests/test_classification.py::test_predict_classifies_chips_into_one_table_as_evaluation_does",)),
    Mutant("(26.6) a second cross-sensor folder overwrites the first one's results",
           "deflect/engine/report.py",
           'if isinstance(saved, dict) and saved.get("root") == root:',
           "if isinstance(saved, dict):",
           ("tests/test_predict.py::test_a_second_cross_sensor_folder_of_one_sensor_keeps_the_first_results",)),
    Mutant("(26.6) cross-sensor evaluation computes statistics in the user's data folder",
           "deflect/engine/report.py",
           'dataset = build.build_dataset(cfg, "test", {"mean": AnyBand(0.0), "std": AnyBand(1.0)}, task)',
           'dataset = build.build_dataset(cfg, "test", task=task)',
           ("tests/test_predict.py::test_a_sentinel2_run_evaluates_on_landsat8_bands_through_the_mapping",)),
    Mutant("(26 pictures) the classification picture shows correct samples first",
           "deflect/tasks/classification/writer.py",
           "chosen = (self.wrong + self.right)[: self.num_panels]",
           "chosen = (self.right + self.wrong)[: self.num_panels]",
           ("tests/test_classification.py::test_the_classification_picture_shows_misclassified_samples_first_under_one_stretch",)),
    Mutant("(26 pictures) each chip of the picture stretched on its own",
           "deflect/tasks/classification/writer.py",
           "limits = stretch_limits([image for image, _, _ in chosen])", "limits = None",
           ("tests/test_classification.py::test_the_classification_picture_shows_misclassified_samples_first_under_one_stretch",)),
    # issue 26 (chips)
    Mutant("(26.3) a dataset's multi_label=no taken as true (bool() of a word)", "deflect/data.py",
           '    if isinstance(value, bool) or type(value).__name__ == "bool_":', "    if True:",
           (f"{INPUTS}test_a_switch_is_true_or_false_never_a_word_taken_as_true",)),
    Mutant("(26.3) dataset.multi_label not among the checked settings", "deflect/engine/run_config.py",
           '        "dataset.multi_label", "task.multi_label", "augmentation.rot90",',
           '        "task.multi_label", "augmentation.rot90",',
           (f"{INPUTS}test_a_switch_is_true_or_false_never_a_word_taken_as_true",)),
    Mutant("(26.5) a chip listed twice in the CSV: the last row wins", "datasets/classification.py",
           "            if chip in seen:", "            if False:",
           (f"{INPUTS}test_a_chip_listed_twice_is_refused_naming_both_lines",)),
    Mutant("(26.7) seeded chip splits not stratified by class", "datasets/classification.py",
           "strata = None if self.multi_label else [parsed[n][0] for n in names]", "strata = None",
           (f"{INPUTS}test_seeded_chip_splits_are_stratified_and_a_class_without_validation_chips_is_said",)),
    Mutant("(26.7) a class without validation chips not warned about", "datasets/classification.py",
           "            if missing:", "            if False:",
           (f"{INPUTS}test_seeded_chip_splits_are_stratified_and_a_class_without_validation_chips_is_said",)),
    Mutant("(26.8) a chip name with '..' reads outside the root", "datasets/classification.py",
           'if not chip or Path(chip).is_absolute() or ".." in Path(chip).parts:',
           "if not chip or Path(chip).is_absolute():",
           (f"{INPUTS}test_a_chip_name_leaving_the_root_is_refused",)),
    Mutant("(26.8) class folder names not stripped ('forest ' a class of its own)",
           "datasets/classification.py", "[path.parent.name.strip()]", "[path.parent.name]",
           (f"{INPUTS}test_class_names_are_stripped_and_near_duplicates_warned_about",)),
    Mutant("(26.8) an image without a valid pixel classified and scored",
           "datasets/classification.py", "        if np.isnan(image).all():", "        if False:",
           (f"{INPUTS}test_an_image_without_a_valid_pixel_is_never_scored",)),
    Mutant("(26.8) multi-label loss over ignored entries", "deflect/tasks/classification/task.py",
           "return (loss * valid).sum() / valid.sum().clamp_min(1)", "return loss.mean()",
           (f"{INPUTS}test_an_image_without_a_valid_pixel_is_never_scored",)),
    Mutant("(26.8) a GEO-Bench label 1.7 truncated to class 1", "datasets/geobench.py",
           "isinstance(value, float) and value.is_integer())", "isinstance(value, float))",
           (f"{INPUTS}test_a_bad_geobench_sample_is_named_when_the_split_is_listed",)),
    Mutant("(26.8) a CSV label 1.7 taken as a class name", "datasets/classification.py",
           "            if NUMBER.fullmatch(label) and not INTEGER.fullmatch(label):",
           "            if False:",
           (f"{INPUTS}test_a_label_that_is_not_a_whole_number_is_refused",)),
    Mutant("(26.8) precision n/a per class but averaged as 0 (two conventions)",
           "deflect/tasks/confusion.py", '"Precision": float(precision[i]) if ok else None,',
           '"Precision": float(precision[i]) if predicted[i] > 0 else None,',
           (f"{INPUTS}test_macro_means_average_exactly_the_per_class_values_shown",)),
    Mutant("(26.8) integer class labels sorted as text (0, 1, 10, 2)", "datasets/classification.py",
           "return sorted(names, key=int)", "return sorted(names)",
           (f"{INPUTS}test_integer_classes_match_integer_labels_and_sort_as_numbers",)),
    Mutant("(26.8) a NaN mF1 from empty label sets said by nothing",
           "deflect/tasks/classification/task.py", "        if not present.any():", "        if False:",
           (f"{INPUTS}test_empty_label_sets_are_scored_as_no_label_and_an_all_empty_split_is_warned_about",)),
    # issue 26 (explain)
    Mutant("(26.12) the band manifest check stops comparing the standard deviations",
           "deflect/data.py", '            "std": (self.std_list(), other.std_list()),\n', "",
           ("tests/test_band_manifest.py",)),
    Mutant("(26.12) the band manifest check stops comparing the means", "deflect/data.py",
           '            "mean": (self.mean_list(), other.mean_list()),\n', "",
           ("tests/test_band_manifest.py",)),
    Mutant("(26.12) band statistics compared to 5 %", "deflect/data.py",
           "rel_tol=1e-6, abs_tol=1e-9", "rel_tol=0.05, abs_tol=1e-9",
           ("tests/test_band_manifest.py",)),
    Mutant("(26.12) the no-data value not compared", "deflect/data.py",
           'for key in ("reflectance_scale", "nodata", "sensor"):',
           'for key in ("reflectance_scale", "sensor"):', ("tests/test_band_manifest.py",)),
    Mutant("(26.12) the sensor not compared", "deflect/data.py",
           'for key in ("reflectance_scale", "nodata", "sensor"):',
           'for key in ("reflectance_scale", "nodata"):', ("tests/test_band_manifest.py",)),
    Mutant("(26.12) bands added since training accepted", "deflect/data.py",
           "    if extra:\n", "    if False:\n", ("tests/test_band_manifest.py",)),
    Mutant("(26.12) a checkpoint's classes not compared", "deflect/engine/checkpoint.py",
           "if trained.classes and list(trained.classes) != list(data.classes):", "if False:",
           ("tests/test_band_manifest.py",)),
    Mutant("(26.12) an adapter's pretrained bands not compared", "deflect/tuners/model.py",
           "if saved_bands is not None and pretrained_bands is not None and saved_bands != "
           "pretrained_bands:", "if False:", ("tests/test_band_manifest.py",)),
    Mutant("(26.2) explain.py explains an unfinished run without --allow-unfinished",
           "deflect/engine/explain.py", "    elif not allow_unfinished:", "    elif False:",
           ("tests/test_ablation.py::test_diagnostics_are_only_of_finished_runs_not_in_use_and_stale_once_best_pt_changes",)),
    Mutant("(26.2) explain.py ignores the run-folder lock", "scripts/explain.py",
           "                locks.append(RunLock(run).acquire())", "                pass",
           ("tests/test_ablation.py::test_diagnostics_are_only_of_finished_runs_not_in_use_and_stale_once_best_pt_changes",)),
    Mutant("(26.2) diagnostics of a changed best.pt read as current", "deflect/engine/diagnostics.py",
           '    if sha256(best) == record["sha256"]:', "    if True:",
           ("tests/test_ablation.py::test_diagnostics_are_only_of_finished_runs_not_in_use_and_stale_once_best_pt_changes",)),
    Mutant("(26.4) a resumed sweep's resume=true compared like a setting", "scripts/ablation_table.py",
           "not in BOOKKEEPING_KEYS]", "not in ()]",
           ("tests/test_ablation.py::test_a_resumed_sweep_lists_its_finished_jobs_as_finished",)),
    Mutant("(26) a sweep job's train.log left open for the next job's launch", "run.py",
           "        close_log_file()  # this job's", "        pass  # this job's",
           ("tests/test_ablation.py::test_every_job_has_its_folder_and_failures_say_why",)),
    Mutant("(26) early stopping's patience count lost on resume", "deflect/engine/trainer.py",
           'self.epochs_without_improvement = int(stopping["epochs_without_improvement"])',
           "self.epochs_without_improvement = 0", ("tests/test_early_stopping.py",)),
    Mutant("(26) early stopping ignores min_delta", "deflect/engine/trainer.py",
           "if self._better(score, self.patience_score, self.settings.early_stopping_min_delta):",
           "if self._better(score, self.patience_score):", ("tests/test_early_stopping.py",)),
    # issue 30 (onnx)
    Mutant("(30.1) normalisation left out of the exported graph", "deflect/export/graph.py",
           "        return (x - self.mean) / self.std", "        return x",
           ("tests/test_export.py::test_onnx_equals_pytorch_on_raw_input_at_the_traced_size_and_two_others",)),
    Mutant("(30.2) the training no-data value not invalid in the exported graph",
           "deflect/export/graph.py", "            invalid = invalid | (raw == self.nodata)",
           "            invalid = invalid",
           ("tests/test_export.py::test_onnx_equals_pytorch_on_raw_input_at_the_traced_size_and_two_others",)),
    Mutant("(30.3) adaptive pooling exported as traced (the AveragePool kernel of the traced size)",
           "deflect/export/graph.py", "    pools = replace_adaptive_pools(prepared)",
           "    pools = 0",
           ("tests/test_export.py::test_onnx_equals_pytorch_on_raw_input_at_the_traced_size_and_two_others",)),
    Mutant("(30.4) LoRA run beside the weights, not merged", "deflect/export/graph.py",
           "            encoder.merge_adapter()\n", "            pass\n",
           ("tests/test_export.py::test_lora_is_merged_into_the_weights",)),
    Mutant("(30.5) predict --onnx: another reflectance scale not converted for a raw-input model",
           "deflect/engine/predict.py",
           "    image = read_valid(src, indexes, window, spec, nodata, factors)\n"
           "    if not normalise:\n        return image\n",
           "    if not normalise:\n        return read_valid(src, indexes, window, spec, nodata)\n"
           "    image = read_valid(src, indexes, window, spec, nodata, factors)\n",
           ("tests/test_export.py::test_a_scene_mapped_with_onnx_runtime_equals_the_pytorch_map",)),
    Mutant("(30.6) predict --onnx normalises tiles the file normalises again",
           "deflect/engine/predict.py", "        normalise=not predictor.raw_input,",
           "        normalise=True,",
           ("tests/test_export.py::test_a_scene_mapped_with_onnx_runtime_equals_the_pytorch_map",)),
    # issue 27 (engine)
    Mutant("(27) a lower-is-better monitor kept as if higher were better",
           "deflect/engine/trainer.py", "        return score < reference - margin",
           "        return score > reference + margin",
           ("tests/test_early_stopping.py::test_a_lower_is_better_metric_selects_and_stops_as_its_mirror_image",)),
    Mutant("(27) Figure 1 scores an error metric upwards", "scripts/ablation_table.py",
           "((v - low) if higher_is_better else (high - v))", "(v - low)",
           ("tests/test_ablation.py::test_figure_1_puts_a_lower_is_better_headline_on_the_same_scale_as_the_others",)),
    Mutant("(27) a task imports the engine again", "deflect/tasks/confusion.py",
           "from deflect.tasks.base import Metric\n",
           "from deflect.tasks.base import Metric\nfrom deflect.engine.distributed import DistInfo  # noqa\n",
           ("tests/test_layers.py::test_no_import_runs_back_up",)),
    Mutant("(27) the engine names a metric", "deflect/engine/report.py",
           "            task.log_line(metrics),", '            metrics["mIoU"],',
           ("tests/test_layers.py::test_the_engine_names_no_task_and_no_metric",)),
    Mutant("(27) the task config's options are dropped", "deflect/tasks/registry.py",
           "    return task_class(str(name))(**options)", "    return task_class(str(name))()",
           ("tests/test_task_registry.py",)),
]  # fmt: skip


def copy_repo(dest: Path) -> None:
    """The tracked and untracked-but-not-ignored files of the repository."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    for name in files:
        source = REPO / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run(mutant: Mutant, root: Path) -> tuple[bool, str]:
    """Apply ``mutant`` in ``root``, run its tests there, undo it. (caught, first failure)."""
    path = root / mutant.path
    original = path.read_text()
    if mutant.old not in original:
        raise SystemExit(f"mutant {mutant.what!r}: pattern not found in {mutant.path}")
    mutated = original.replace(mutant.old, mutant.new, 1)
    for old, new in mutant.also:
        if old not in mutated:
            raise SystemExit(f"mutant {mutant.what!r}: pattern not found in {mutant.path}")
        mutated = mutated.replace(old, new, 1)
    path.write_text(mutated)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutant.tests],
            cwd=root, capture_output=True, text=True,
            # The copy's own code, also in subprocesses that run a script (sys.path[0] = scripts/).
            env={**os.environ, "PYTHONPATH": str(root)},
        )  # fmt: skip
    finally:
        path.write_text(original)
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    # A mutant that does not even import is not "caught" by a test: report it as broken.
    return bool(failed), (failed[0] if failed else proc.stdout.strip()[-300:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("numbers", nargs="*", type=int, help="mutants to run (1-based)")
    args = parser.parse_args()
    chosen = [(i, m) for i, m in enumerate(MUTANTS, 1) if not args.numbers or i in args.numbers]
    missed = 0
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        root = Path(tmp)
        copy_repo(root)
        for i, mutant in chosen:
            caught, detail = run(mutant, root)
            missed += not caught
            print(f"{i:2d} {'CAUGHT' if caught else 'MISSED'}  {mutant.what}  | {detail}",
                  flush=True)  # fmt: skip
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
