"""The edge's models and its cloud link, ready to generate: what `generate`, `chat` and `serve-edge` share.

An `Assistant` loads Q with llama.cpp, connects to the cloud verifier (a remote one, or an embedded
one started in this process on a loopback port: the same gRPC path as a remote one), checks that
the vocabularies match, and runs HybridGenerator for each request.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from handoff.edge.controller import HybridGenerator
from handoff.edge.cross import CrossGenerator, cross_generator
from handoff.edge.mixture import MixtureRunner, load_experts
from handoff.edge.policy.default import AUTO, auto_policy
from handoff.edge.records import GenerationResult, OnToken
from handoff.edge.runner import EdgeRunner
from handoff.edge.settings import EdgeSettings
from handoff.edge.verifier_client import GrpcTransport, VerifierClient
from handoff.shared.constraints import Constraint
from handoff.shared.errors import ShapeError, VerifierError, VocabularyMismatch
from handoff.shared.model_info import load_model_info
from handoff.shared.models import resolve
from handoff.shared.sampling import SamplingSettings
from handoff.shared.settings import HandoffSettings
from handoff.shared.vocab import check_vocabularies

logger = logging.getLogger(__name__)


class Assistant:
    """Q on this device plus a link to P; use as `async with Assistant(...) as a: await a.generate(...)`."""

    def __init__(
        self,
        settings: HandoffSettings,
        edge: EdgeSettings,
        *,
        edge_model: str | None = None,
        cloud_model: str | None = None,
    ) -> None:
        """Describe the assistant; nothing is loaded before `async with`.

        Args:
            settings: process settings (cache, threads, default models).
            edge: the cloud's address, mode, policy and timeouts.
            edge_model: Q (registry name or GGUF path); default settings.edge_model.
            cloud_model: P for an embedded verifier; default settings.cloud_model.
        """
        self.settings = settings
        self.edge = edge
        self.edge_ref = resolve(edge_model or settings.edge_model, "edge", settings)
        self.cloud_model = cloud_model or settings.cloud_model
        self.policy = edge.policy_config()
        self.cloud_info: dict[str, str] = {}
        self.runner: EdgeRunner | MixtureRunner | None = None
        self.client: VerifierClient | None = None
        self._server = None
        self.generator: HybridGenerator | CrossGenerator | None = None
        self.cross = False  # Q's vocabulary is not the cloud's: text-aligned sessions (edge/cross.py)

    @property
    def model_name(self) -> str:
        return self.edge_ref.name

    async def __aenter__(self) -> Assistant:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _start(self) -> None:
        _, vocabulary = load_model_info(self.edge_ref, self.settings)
        if self.edge.mode != "edge":
            target = self.edge.cloud
            if target is None:
                target = await self._start_embedded()
            root = self.edge.tls_ca.read_bytes() if self.edge.tls_ca else None
            self.client = VerifierClient(
                GrpcTransport(
                    target,
                    tls=self.edge.tls,
                    root_certificates=root,
                    auth_token=self.edge.auth_token,
                    delay=self.edge.network_delay(),
                )
            )
            try:
                try:
                    info = await self.client.check_vocabulary(vocabulary)
                except VocabularyMismatch as e:
                    info = await self.client.info()
                    if not info.text_sessions:
                        raise
                    # Another tokenizer: text-aligned sessions (edge/cross.py, docs/tokenizers.md).
                    logger.info("the cloud's vocabulary is not Q's (%s): sessions go by text", e)
                    self.cross = True
                self.cloud_info = {
                    "model": info.model_id,
                    "backend": info.backend,
                    "device": info.device,
                    "deterministic": str(info.deterministic).lower(),
                    "constraints": str(info.constraints).lower(),
                }
            except VerifierError as e:
                if e.code != "UNAVAILABLE" or self.edge.mode == "cloud":
                    raise
                # The session's open checks the fingerprint again once the cloud is back.
                logger.warning("the cloud at %s is unreachable (%s): starting on the edge alone", target, e)
        if self.edge.policy == AUTO and self.edge.mode == "hybrid":
            self.policy = auto_policy(
                self.policy, vocabulary, plain=not self.cross and not self.edge.experts.strip()
            )
        self.runner = self._runner(vocabulary)
        if self.cross:
            assert self.client is not None and isinstance(self.runner, EdgeRunner)
            self.generator = await cross_generator(
                self.runner,
                self.client,
                self.policy,
                mode=self.edge.mode,
                link=self.edge.link_config(),
                cache_dir=self.settings.cache_dir / "alignments",
            )
            return
        self.generator = HybridGenerator(
            self.runner,
            self.client,
            vocabulary,
            self.policy,
            mode=self.edge.mode,
            link=self.edge.link_config(),
        )

    def _runner(self, vocabulary) -> EdgeRunner | MixtureRunner:
        """Q's runner, or a mixture of experts' (each expert's model checked against Q's vocabulary)."""

        def load(path) -> EdgeRunner:
            return EdgeRunner(
                path, k=self.policy.top_k, n_ctx=self.edge.n_ctx, n_threads=self.settings.threads
            )

        specs = load_experts(self.edge.experts)
        if self.policy.kind == "mixture" and len(specs) < 2:
            raise ShapeError("--policy mixture needs two or more experts on the edge: give --experts")
        if not specs:
            return load(self.edge_ref.path)
        experts = []
        try:
            for spec in specs:
                ref = self.edge_ref if not spec.model else resolve(spec.model, "edge", self.settings)
                if ref.path != self.edge_ref.path:
                    check_vocabularies(vocabulary, load_model_info(ref, self.settings)[1])
                experts.append((spec, load(ref.path)))
        except BaseException:
            for _, r in experts:
                r.close()
            raise
        logger.info("edge experts: %s", ", ".join(s.name for s in specs))
        return MixtureRunner(experts)

    async def _start_embedded(self) -> str:
        from handoff.cloud.grpc_server import CloudServer
        from handoff.cloud.loader import load_backend
        from handoff.cloud.settings import CloudSettings

        cloud_settings = CloudSettings(
            model=self.cloud_model,
            host="127.0.0.1",
            port=0,
            threads=self.settings.threads,
            max_sessions=4,
            max_context=self.edge.n_ctx,
            grace_s=0.5,
        )
        self._server = CloudServer(cloud_settings, lambda: load_backend(cloud_settings, self.settings))
        await self._server.start()
        return f"127.0.0.1:{self._server.port}"

    def chat_prompt_ids(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
    ) -> list[int]:
        """Token ids of a conversation (and the tools offered) rendered with Q's chat template, ready for the answer."""
        assert self.runner is not None
        return self.runner.model.tokenize(self.runner.model.chat_prompt(messages, tools=tools))

    def tokenize(self, text: str) -> list[int]:
        assert self.runner is not None
        return self.runner.model.tokenize(text)

    async def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        *,
        sampling: SamplingSettings | None = None,
        on_token: OnToken | None = None,
        constraint: Constraint | None = None,
    ) -> GenerationResult:
        """One generation through the configured mode and policy (see HybridGenerator.generate)."""
        assert self.generator is not None, "use the Assistant inside `async with`"
        return await self.generator.generate(
            prompt_ids,
            max_tokens,
            sampling=sampling or SamplingSettings(),
            on_token=on_token,
            constraint=constraint,
        )

    async def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None
        if self.client is not None:
            await self.client.close()
            self.client = None
        if self._server is not None:
            await self._server.stop(grace=0.5)
            self._server = None
