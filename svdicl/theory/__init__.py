"""The paper's theory (section 3, appendix A, fig 5), checked numerically; docs/theory.md explains each check.

    lemma1   Lemma 1 and Theorem 1: linear attention over demonstrations = zero-shot path + an
             implicit update dW of rank <= n, composed layer by layer through a stack
    norms    Examples 1-4: truncating W_V, W_K, W_Q or the MLP lowers a bound on ||dW||_F
    linreg   a GPT-2 trained on in-context linear regression vs least squares, pruned shallow vs deep
    figures  the figures of all three
    checks   each check end to end: settings checked, numbers computed, JSON, CSV and figures written

Command line: `svdicl theory lemma1 | norms | linreg`.
"""
