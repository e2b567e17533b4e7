"""SAE evaluation: reconstruction, downstream CE/KL, latent statistics, feature absorption,
sparse probing and a contrastive interpretability score; probing on any labelled text; feature
inspection (dashboards, prompt view, Neuronpedia-style JSON); steering with SAE features,
diff-in-means and CorrSteer.

```python
report = analysis.evaluate(sae_model, lm, "blocks.15.hook_resid_post", n_tokens=4096)
report["meta"]["text"]    # which split of which text, how many documents and tokens
report["warnings"]        # why any result should not be trusted (listed in report["unreliable"])
analysis.save_report(report, "eval.json"); analysis.write_plots(report, "plots/")
print(analysis.compare_table({"run-a": report_a, "run-b": report_b}))
```
"""

from .absorption import AbsorptionConfig, absorption_eval, absorption_from_acts
from .concepts import concept_lexicon, concept_names, concept_sentences, steering_prompts
from .contrastive import contrastive_eval, contrastive_scores
from .datasets import load_contrastive_pairs, load_probing_datasets
from .downstream import downstream_scores, downstream_sums, sae_splice, zero_splice
from .evaluate import EvalConfig, evaluate
from .features import (
    FeatureConfig,
    FeatureStats,
    PromptView,
    collect_features,
    feature_figure,
    logit_effects,
    neuronpedia_batch,
    prompt_view,
    write_dashboard,
    write_neuronpedia_json,
)
from .layer_groups import amad, angular_similarity, group_layers, layer_similarity
from .labelled import REAL_TASKS, LabelledTexts, load_labelled, read_labelled
from .labelled import dataset_names as probing_dataset_names
from .metrics import (
    ReconstructionStats,
    density_stats,
    max_decoder_cosine,
    reconstruction_metrics,
)
from .plots import plot_decoder_cosine, plot_density, write_plots
from .pooling import POOLINGS, pool_texts
from .probing import ProbeConfig, ProbingConfig, probe, probe_features, probe_table, probe_task, sparse_probing
from .quantize import quantize_rtn, quantized_layers, removed_layer
from .rate import CodeRate
from .reliability import ReliabilityConfig, reliability_flags
from .report import compare_table
from .report import write_json as save_report
from .sensitivity_plots import write_sensitivity_plots
from .steering import (
    ablate_latents,
    add_vector,
    clamp_latents,
    concept_latents,
    diff_in_means,
    generate,
    latent_vector,
    mean_activation,
    mean_codes,
    steer_site,
)
from .steering_eval import ConceptProbe, lexicon_score, plot_sweep, steering_sweep, sweep_table

__all__ = [
    "AbsorptionConfig",
    "CodeRate",
    "ConceptProbe",
    "EvalConfig",
    "FeatureConfig",
    "FeatureStats",
    "LabelledTexts",
    "POOLINGS",
    "ProbeConfig",
    "ProbingConfig",
    "PromptView",
    "REAL_TASKS",
    "ReconstructionStats",
    "ReliabilityConfig",
    "ablate_latents",
    "absorption_eval",
    "absorption_from_acts",
    "add_vector",
    "amad",
    "angular_similarity",
    "clamp_latents",
    "collect_features",
    "compare_table",
    "concept_latents",
    "concept_lexicon",
    "concept_names",
    "concept_sentences",
    "contrastive_eval",
    "contrastive_scores",
    "density_stats",
    "diff_in_means",
    "downstream_scores",
    "downstream_sums",
    "evaluate",
    "feature_figure",
    "generate",
    "group_layers",
    "latent_vector",
    "layer_similarity",
    "lexicon_score",
    "load_contrastive_pairs",
    "load_labelled",
    "load_probing_datasets",
    "logit_effects",
    "max_decoder_cosine",
    "mean_activation",
    "mean_codes",
    "neuronpedia_batch",
    "plot_decoder_cosine",
    "plot_density",
    "plot_sweep",
    "pool_texts",
    "probe",
    "probe_features",
    "probe_table",
    "probe_task",
    "probing_dataset_names",
    "prompt_view",
    "quantize_rtn",
    "quantized_layers",
    "read_labelled",
    "removed_layer",
    "reconstruction_metrics",
    "reliability_flags",
    "sae_splice",
    "save_report",
    "sparse_probing",
    "steer_site",
    "steering_prompts",
    "steering_sweep",
    "sweep_table",
    "write_dashboard",
    "write_neuronpedia_json",
    "write_plots",
    "write_sensitivity_plots",
    "zero_splice",
]
