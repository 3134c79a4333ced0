from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PolicyKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_KIND_UNSPECIFIED: _ClassVar[PolicyKind]
    POLICY_KIND_SEED: _ClassVar[PolicyKind]
    POLICY_KIND_ROLLBACK: _ClassVar[PolicyKind]
    POLICY_KIND_EXACT: _ClassVar[PolicyKind]
    POLICY_KIND_SKIP: _ClassVar[PolicyKind]
    POLICY_KIND_ADAPTIVE: _ClassVar[PolicyKind]
POLICY_KIND_UNSPECIFIED: PolicyKind
POLICY_KIND_SEED: PolicyKind
POLICY_KIND_ROLLBACK: PolicyKind
POLICY_KIND_EXACT: PolicyKind
POLICY_KIND_SKIP: PolicyKind
POLICY_KIND_ADAPTIVE: PolicyKind

class TopK(_message.Message):
    __slots__ = ("ids", "logprobs")
    IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class VocabFingerprint(_message.Message):
    __slots__ = ("vocab_size", "block_size", "block_digests", "digest", "algorithm")
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    vocab_size: int
    block_size: int
    block_digests: _containers.RepeatedScalarFieldContainer[bytes]
    digest: bytes
    algorithm: str
    def __init__(self, vocab_size: _Optional[int] = ..., block_size: _Optional[int] = ..., block_digests: _Optional[_Iterable[bytes]] = ..., digest: _Optional[bytes] = ..., algorithm: _Optional[str] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed", "has_seed", "stop_token_ids")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HAS_SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    has_seed: bool
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., has_seed: _Optional[bool] = ..., stop_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("kind", "check_interval", "threshold", "aggregation", "handback_tokens", "seed_tokens", "extra")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    CHECK_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    HANDBACK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    kind: PolicyKind
    check_interval: int
    threshold: float
    aggregation: str
    handback_tokens: int
    seed_tokens: int
    extra: _containers.ScalarMap[str, str]
    def __init__(self, kind: _Optional[_Union[PolicyKind, str]] = ..., check_interval: _Optional[int] = ..., threshold: _Optional[float] = ..., aggregation: _Optional[str] = ..., handback_tokens: _Optional[int] = ..., seed_tokens: _Optional[int] = ..., extra: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_sessions", "max_context", "max_message_bytes", "max_top_k", "max_tokens_per_append", "max_handoff_tokens", "max_draft_tokens", "session_idle_timeout_s")
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_APPEND_FIELD_NUMBER: _ClassVar[int]
    MAX_HANDOFF_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SESSION_IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    max_sessions: int
    max_context: int
    max_message_bytes: int
    max_top_k: int
    max_tokens_per_append: int
    max_handoff_tokens: int
    max_draft_tokens: int
    session_idle_timeout_s: int
    def __init__(self, max_sessions: _Optional[int] = ..., max_context: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_top_k: _Optional[int] = ..., max_tokens_per_append: _Optional[int] = ..., max_handoff_tokens: _Optional[int] = ..., max_draft_tokens: _Optional[int] = ..., session_idle_timeout_s: _Optional[int] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ("token_hashes", "token_pieces")
    TOKEN_HASHES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_PIECES_FIELD_NUMBER: _ClassVar[int]
    token_hashes: TokenHashRange
    token_pieces: TokenHashRange
    def __init__(self, token_hashes: _Optional[_Union[TokenHashRange, _Mapping]] = ..., token_pieces: _Optional[_Union[TokenHashRange, _Mapping]] = ...) -> None: ...

class TokenHashRange(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class ServiceInfo(_message.Message):
    __slots__ = ("protocol_version", "model_id", "model_name", "architecture", "parameter_count", "quantization", "context_length", "vocab_size", "vocab", "limits", "backend", "device", "dtype", "policies", "token_hash_start", "token_hashes", "deterministic", "constraints", "token_piece_start", "token_pieces", "text_sessions", "stop_token_ids")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_HASH_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_HASHES_FIELD_NUMBER: _ClassVar[int]
    DETERMINISTIC_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINTS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_PIECE_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_PIECES_FIELD_NUMBER: _ClassVar[int]
    TEXT_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: str
    model_id: str
    model_name: str
    architecture: str
    parameter_count: int
    quantization: str
    context_length: int
    vocab_size: int
    vocab: VocabFingerprint
    limits: Limits
    backend: str
    device: str
    dtype: str
    policies: _containers.RepeatedScalarFieldContainer[PolicyKind]
    token_hash_start: int
    token_hashes: _containers.RepeatedScalarFieldContainer[int]
    deterministic: bool
    constraints: bool
    token_piece_start: int
    token_pieces: _containers.RepeatedScalarFieldContainer[bytes]
    text_sessions: bool
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, protocol_version: _Optional[str] = ..., model_id: _Optional[str] = ..., model_name: _Optional[str] = ..., architecture: _Optional[str] = ..., parameter_count: _Optional[int] = ..., quantization: _Optional[str] = ..., context_length: _Optional[int] = ..., vocab_size: _Optional[int] = ..., vocab: _Optional[_Union[VocabFingerprint, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., policies: _Optional[_Iterable[_Union[PolicyKind, str]]] = ..., token_hash_start: _Optional[int] = ..., token_hashes: _Optional[_Iterable[int]] = ..., deterministic: _Optional[bool] = ..., constraints: _Optional[bool] = ..., token_piece_start: _Optional[int] = ..., token_pieces: _Optional[_Iterable[bytes]] = ..., text_sessions: _Optional[bool] = ..., stop_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class EdgeMessage(_message.Message):
    __slots__ = ("request_id", "open", "append", "check", "handoff", "stop", "rollback", "verify", "close", "append_text")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    APPEND_FIELD_NUMBER: _ClassVar[int]
    CHECK_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    APPEND_TEXT_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    open: OpenSession
    append: AppendTokens
    check: CheckPoint
    handoff: Handoff
    stop: StopGeneration
    rollback: Rollback
    verify: VerifyDraft
    close: Close
    append_text: AppendText
    def __init__(self, request_id: _Optional[int] = ..., open: _Optional[_Union[OpenSession, _Mapping]] = ..., append: _Optional[_Union[AppendTokens, _Mapping]] = ..., check: _Optional[_Union[CheckPoint, _Mapping]] = ..., handoff: _Optional[_Union[Handoff, _Mapping]] = ..., stop: _Optional[_Union[StopGeneration, _Mapping]] = ..., rollback: _Optional[_Union[Rollback, _Mapping]] = ..., verify: _Optional[_Union[VerifyDraft, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ..., append_text: _Optional[_Union[AppendText, _Mapping]] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("prompt_token_ids", "vocab", "sampling", "policy", "top_k", "client", "protocol_version", "constraint", "prompt_text")
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    vocab: VocabFingerprint
    sampling: SamplingParams
    policy: Policy
    top_k: int
    client: str
    protocol_version: str
    constraint: Constraint
    prompt_text: bytes
    def __init__(self, prompt_token_ids: _Optional[_Iterable[int]] = ..., vocab: _Optional[_Union[VocabFingerprint, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ..., top_k: _Optional[int] = ..., client: _Optional[str] = ..., protocol_version: _Optional[str] = ..., constraint: _Optional[_Union[Constraint, _Mapping]] = ..., prompt_text: _Optional[bytes] = ...) -> None: ...

class AppendText(_message.Message):
    __slots__ = ("text", "views")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    text: bytes
    views: _containers.RepeatedCompositeFieldContainer[EdgeToken]
    def __init__(self, text: _Optional[bytes] = ..., views: _Optional[_Iterable[_Union[EdgeToken, _Mapping]]] = ...) -> None: ...

class Constraint(_message.Message):
    __slots__ = ("grammar", "frequency_penalty", "presence_penalty", "logit_bias", "completion_start")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_START_FIELD_NUMBER: _ClassVar[int]
    grammar: str
    frequency_penalty: float
    presence_penalty: float
    logit_bias: _containers.ScalarMap[int, float]
    completion_start: int
    def __init__(self, grammar: _Optional[str] = ..., frequency_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., completion_start: _Optional[int] = ...) -> None: ...

class EdgeToken(_message.Message):
    __slots__ = ("position", "token_id", "topk", "has_distribution", "sampled_logprob")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    HAS_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    position: int
    token_id: int
    topk: TopK
    has_distribution: bool
    sampled_logprob: float
    def __init__(self, position: _Optional[int] = ..., token_id: _Optional[int] = ..., topk: _Optional[_Union[TopK, _Mapping]] = ..., has_distribution: _Optional[bool] = ..., sampled_logprob: _Optional[float] = ...) -> None: ...

class AppendTokens(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[EdgeToken]
    def __init__(self, tokens: _Optional[_Iterable[_Union[EdgeToken, _Mapping]]] = ...) -> None: ...

class CheckPoint(_message.Message):
    __slots__ = ("from_position", "through_position", "skip_unchecked")
    FROM_POSITION_FIELD_NUMBER: _ClassVar[int]
    THROUGH_POSITION_FIELD_NUMBER: _ClassVar[int]
    SKIP_UNCHECKED_FIELD_NUMBER: _ClassVar[int]
    from_position: int
    through_position: int
    skip_unchecked: bool
    def __init__(self, from_position: _Optional[int] = ..., through_position: _Optional[int] = ..., skip_unchecked: _Optional[bool] = ...) -> None: ...

class Handoff(_message.Message):
    __slots__ = ("max_tokens",)
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    def __init__(self, max_tokens: _Optional[int] = ...) -> None: ...

class StopGeneration(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Rollback(_message.Message):
    __slots__ = ("length",)
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    length: int
    def __init__(self, length: _Optional[int] = ...) -> None: ...

class VerifyDraft(_message.Message):
    __slots__ = ("draft", "draft_distributions")
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    DRAFT_DISTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    draft: _containers.RepeatedCompositeFieldContainer[EdgeToken]
    draft_distributions: _containers.RepeatedCompositeFieldContainer[TopK]
    def __init__(self, draft: _Optional[_Iterable[_Union[EdgeToken, _Mapping]]] = ..., draft_distributions: _Optional[_Iterable[_Union[TopK, _Mapping]]] = ...) -> None: ...

class Close(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CloudMessage(_message.Message):
    __slots__ = ("request_id", "opened", "appended", "check", "token", "handoff_done", "rolled_back", "verified", "closed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OPENED_FIELD_NUMBER: _ClassVar[int]
    APPENDED_FIELD_NUMBER: _ClassVar[int]
    CHECK_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_DONE_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    opened: SessionOpened
    appended: Appended
    check: CheckPointResult
    token: CloudToken
    handoff_done: HandoffDone
    rolled_back: RolledBack
    verified: VerifyResult
    closed: Closed
    def __init__(self, request_id: _Optional[int] = ..., opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., appended: _Optional[_Union[Appended, _Mapping]] = ..., check: _Optional[_Union[CheckPointResult, _Mapping]] = ..., token: _Optional[_Union[CloudToken, _Mapping]] = ..., handoff_done: _Optional[_Union[HandoffDone, _Mapping]] = ..., rolled_back: _Optional[_Union[RolledBack, _Mapping]] = ..., verified: _Optional[_Union[VerifyResult, _Mapping]] = ..., closed: _Optional[_Union[Closed, _Mapping]] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "length", "info", "compute_s", "reused_tokens", "server_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    REUSED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    length: int
    info: ServiceInfo
    compute_s: float
    reused_tokens: int
    server_id: str
    def __init__(self, session_id: _Optional[str] = ..., length: _Optional[int] = ..., info: _Optional[_Union[ServiceInfo, _Mapping]] = ..., compute_s: _Optional[float] = ..., reused_tokens: _Optional[int] = ..., server_id: _Optional[str] = ...) -> None: ...

class Appended(_message.Message):
    __slots__ = ("length",)
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    length: int
    def __init__(self, length: _Optional[int] = ...) -> None: ...

class PositionScore(_message.Message):
    __slots__ = ("position", "topk", "logprobs_at_edge_topk", "token_logprob", "offset")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_AT_EDGE_TOPK_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    position: int
    topk: TopK
    logprobs_at_edge_topk: _containers.RepeatedScalarFieldContainer[float]
    token_logprob: float
    offset: int
    def __init__(self, position: _Optional[int] = ..., topk: _Optional[_Union[TopK, _Mapping]] = ..., logprobs_at_edge_topk: _Optional[_Iterable[float]] = ..., token_logprob: _Optional[float] = ..., offset: _Optional[int] = ...) -> None: ...

class CheckPointResult(_message.Message):
    __slots__ = ("scores", "forward_ms", "batch_size", "compute_s")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    FORWARD_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[PositionScore]
    forward_ms: float
    batch_size: int
    compute_s: float
    def __init__(self, scores: _Optional[_Iterable[_Union[PositionScore, _Mapping]]] = ..., forward_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., compute_s: _Optional[float] = ...) -> None: ...

class CloudToken(_message.Message):
    __slots__ = ("position", "token_id", "topk", "token_logprob", "text")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    position: int
    token_id: int
    topk: TopK
    token_logprob: float
    text: bytes
    def __init__(self, position: _Optional[int] = ..., token_id: _Optional[int] = ..., topk: _Optional[_Union[TopK, _Mapping]] = ..., token_logprob: _Optional[float] = ..., text: _Optional[bytes] = ...) -> None: ...

class HandoffDone(_message.Message):
    __slots__ = ("reason", "length", "compute_s")
    class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REASON_UNSPECIFIED: _ClassVar[HandoffDone.Reason]
        REASON_MAX_TOKENS: _ClassVar[HandoffDone.Reason]
        REASON_STOP_TOKEN: _ClassVar[HandoffDone.Reason]
        REASON_STOPPED: _ClassVar[HandoffDone.Reason]
        REASON_CONTEXT_FULL: _ClassVar[HandoffDone.Reason]
    REASON_UNSPECIFIED: HandoffDone.Reason
    REASON_MAX_TOKENS: HandoffDone.Reason
    REASON_STOP_TOKEN: HandoffDone.Reason
    REASON_STOPPED: HandoffDone.Reason
    REASON_CONTEXT_FULL: HandoffDone.Reason
    REASON_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    reason: HandoffDone.Reason
    length: int
    compute_s: float
    def __init__(self, reason: _Optional[_Union[HandoffDone.Reason, str]] = ..., length: _Optional[int] = ..., compute_s: _Optional[float] = ...) -> None: ...

class RolledBack(_message.Message):
    __slots__ = ("length",)
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    length: int
    def __init__(self, length: _Optional[int] = ...) -> None: ...

class VerifyResult(_message.Message):
    __slots__ = ("accepted", "next", "bonus", "length", "compute_s")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    BONUS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    next: CloudToken
    bonus: bool
    length: int
    compute_s: float
    def __init__(self, accepted: _Optional[int] = ..., next: _Optional[_Union[CloudToken, _Mapping]] = ..., bonus: _Optional[bool] = ..., length: _Optional[int] = ..., compute_s: _Optional[float] = ...) -> None: ...

class Closed(_message.Message):
    __slots__ = ("tokens_scored", "tokens_generated", "compute_s")
    TOKENS_SCORED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    tokens_scored: int
    tokens_generated: int
    compute_s: float
    def __init__(self, tokens_scored: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., compute_s: _Optional[float] = ...) -> None: ...
