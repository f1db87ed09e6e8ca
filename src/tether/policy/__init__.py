"""Decision core: Cedar policies, decision boundaries, approvals, JIT grants, group limits."""
