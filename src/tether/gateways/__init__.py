"""Enforcement points: each translates one protocol into Actions for the decision core.

``llm`` is the OpenAI / Anthropic inference gateway. Gateways import the core (identity,
policy, audit, store); the core never imports a gateway.
"""
