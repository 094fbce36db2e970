"""Membership-inference attacks on score arrays: the black-box side, numpy (+ scipy) only.

This package never imports torch: it scores outputs that came from anywhere (a torch model, an
ONNX file, a simulated crossbar). The attacker's learned models live in
``nvmpriv.attack_models``.

Typical use::

    from nvmpriv.attacks import AttackInputs, run_attacks
    inputs = AttackInputs(member_probs, member_labels, nonmember_probs, nonmember_labels,
                          shadow_member_outputs=..., shadow_member_labels=..., ...)
    for name, result in run_attacks(None, inputs).items():
        print(result.summary())
"""

from nvmpriv.attacks._validate import AttackInputError
from nvmpriv.attacks.inputs import AttackInputs, ReferenceScores, SplitOutputs
from nvmpriv.attacks.metrics import (
    balanced_accuracy_at,
    best_threshold,
    cross_validated_accuracy,
    decision_metrics,
    degenerate_reason,
    fpr_resolvable,
    nonmembers_needed,
    precision_recall_f1,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
)
from nvmpriv.attacks.querying import (
    QueryFn,
    average_queries,
    averaging_report,
    query_averaging_curve,
)
from nvmpriv.attacks.reference import (
    gaussian_fit,
    lira_attack,
    lira_scores,
    rmia_attack,
    rmia_scores,
)
from nvmpriv.attacks.registry import (
    ATTACK_REQUIREMENTS,
    SCORE_ATTACKS,
    available_attacks,
    run_attack,
    run_attacks,
)
from nvmpriv.attacks.result import LOW_FPR_BUDGETS, AttackResult, result_from_scores
from nvmpriv.attacks.scores import (
    confidence_scores,
    correctness_scores,
    entropy_scores,
    log_softmax,
    logit_scaled_confidence,
    loss_scores,
    modified_entropy_scores,
    softmax,
)
from nvmpriv.attacks.threshold import (
    SCORE_FUNCTIONS,
    class_dependent_thresholds,
    class_threshold_attack,
    gap_attack,
    global_threshold_attack,
)

__all__ = [
    "ATTACK_REQUIREMENTS",
    "LOW_FPR_BUDGETS",
    "SCORE_ATTACKS",
    "SCORE_FUNCTIONS",
    "AttackInputError",
    "AttackInputs",
    "AttackResult",
    "QueryFn",
    "ReferenceScores",
    "SplitOutputs",
    "available_attacks",
    "average_queries",
    "averaging_report",
    "balanced_accuracy_at",
    "best_threshold",
    "class_dependent_thresholds",
    "class_threshold_attack",
    "confidence_scores",
    "correctness_scores",
    "cross_validated_accuracy",
    "decision_metrics",
    "degenerate_reason",
    "entropy_scores",
    "fpr_resolvable",
    "gap_attack",
    "gaussian_fit",
    "global_threshold_attack",
    "lira_attack",
    "lira_scores",
    "log_softmax",
    "logit_scaled_confidence",
    "loss_scores",
    "modified_entropy_scores",
    "nonmembers_needed",
    "precision_recall_f1",
    "query_averaging_curve",
    "result_from_scores",
    "rmia_attack",
    "rmia_scores",
    "roc_auc",
    "roc_curve",
    "run_attack",
    "run_attacks",
    "softmax",
    "tpr_at_fpr",
]
