"""SGLang's radix cache extended with position-independent document nodes.

Not built yet (issue: radix_ext). Until then the engine keeps compiled documents in
`epic_sglang.doc_cache.DocumentCache`, whose keys and locking this package will take over.
"""
