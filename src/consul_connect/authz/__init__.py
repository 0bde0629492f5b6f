"""Authorization: Consul's intention model and the authorizers built on it.

For now this re-exports :mod:`consul_connect.authz.intentions`, the pure intention model
(precedence, ordering, source matching, validation, L4/L7 decisions) shared by the dev agent
and the library's local authorizer.
"""

from __future__ import annotations

from consul_connect.authz.intentions import (
    ACTION_ALLOW,
    ACTION_DENY,
    DEFAULT_REASON,
    HTTP_METHODS,
    SOURCE_TYPE_CONSUL,
    WILDCARD,
    Decision,
    HeaderMatch,
    HTTPMatch,
    Intention,
    IntentionDecodeError,
    IntentionSet,
    IntentionValidationError,
    Permission,
    ServiceIntentionsEntry,
    SourceIntention,
    compute_precedence,
    config_entry_from_intentions,
    intentions_from_config_entry,
    normalize_config_entry,
    sort_intentions,
    source_matches,
    validate_config_entry,
    validate_legacy_intention,
    validate_wildcards,
)

__all__ = [
    "ACTION_ALLOW",
    "ACTION_DENY",
    "DEFAULT_REASON",
    "HTTP_METHODS",
    "SOURCE_TYPE_CONSUL",
    "WILDCARD",
    "Decision",
    "HTTPMatch",
    "HeaderMatch",
    "Intention",
    "IntentionDecodeError",
    "IntentionSet",
    "IntentionValidationError",
    "Permission",
    "ServiceIntentionsEntry",
    "SourceIntention",
    "compute_precedence",
    "config_entry_from_intentions",
    "intentions_from_config_entry",
    "normalize_config_entry",
    "sort_intentions",
    "source_matches",
    "validate_config_entry",
    "validate_legacy_intention",
    "validate_wildcards",
]
