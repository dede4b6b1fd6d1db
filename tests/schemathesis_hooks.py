"""Schemathesis hooks for tests/test_api_schema.py: one check of our own on top of schemathesis' built-in ones.

The chat route may answer a schema-valid request with 400 only where JSON Schema cannot say the rule: the
order of the roles and the images of `messages` (user, assistant, ..., user; one image, in a user message;
an image that is no image), and the context length (prompt plus max_tokens). The config lets
positive_data_acceptance take 400 there; this check makes sure such a 400 is one of those and never, say,
a sampling setting the schema allows.
"""
import schemathesis


@schemathesis.check
def schema_valid_rejected_only_for_rules_json_schema_cannot_state(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    if case.operation.path != "/v1/chat/completions" or case.operation.method.upper() != "POST":
        raise AssertionError(f"schema-valid request to {case.operation.label} answered 400: {response.text[:300]}")
    error = response.json()["error"]
    param, code = error.get("param") or "", error.get("code")
    if not (param.startswith("messages") or code == "context_length_exceeded"):
        raise AssertionError(f"schema-valid request rejected for '{param}' ({code}): {error['message']}")
    return None
