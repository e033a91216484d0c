package dev.matformer

import dev.matformer.ffi.DraftCache
import dev.matformer.ffi.DraftChoice
import dev.matformer.ffi.GenerateOptions
import dev.matformer.ffi.SpeculativeOptions

/**
 * Speculative decoding with a nested draft submodel: the draft proposes [k] tokens, the session's
 * own submodel (the verifier) checks them in one batched pass and keeps the longest agreeing
 * prefix plus its own next token. The answer is the verifier's: greedy tokens are exactly those
 * of plain decoding, sampled ones follow the same distribution. Pass the result as
 * `GenerateOptions(speculative = ...)` or through [withSpeculative]; after the call,
 * [MatformerSession.speculativeStats] tells how well the draft did.
 *
 * [draft] must be narrower than the verifier (no layer wider, at least one narrower), else the
 * generation fails with [MatformerException.InvalidArgument]; an unknown name fails with
 * [MatformerException.Model]. [cache] `SHARED` (default) drafts on the verifier's KV cache with no
 * extra memory; `OWN` gives the draft a KV cache of its own. With [adaptive], `k` grows by one
 * after a fully accepted round (up to [maxK]) and shrinks by one after a rejection. With
 * [draftVocab], the draft proposes only among the first [draftVocab] token ids: its LM head reads
 * that many rows instead of the whole vocabulary's (the largest product of a narrow draft step on
 * a large vocabulary); the answer is still the verifier's.
 *
 * @throws MatformerException.InvalidArgument when [k] is below 1, [maxK] below [k] or
 *   [draftVocab] below 1.
 */
fun speculative(
    draft: DraftChoice = DraftChoice.Auto,
    cache: DraftCache = DraftCache.SHARED,
    k: Int = 4,
    maxK: Int = maxOf(8, k),
    adaptive: Boolean = true,
    draftVocab: Int? = null,
): SpeculativeOptions {
    if (k < 1) throw MatformerException.InvalidArgument("speculative k must be at least 1, not $k")
    if (maxK < k) throw MatformerException.InvalidArgument("speculative maxK ($maxK) must be at least k ($k)")
    if (draftVocab != null && draftVocab < 1) {
        throw MatformerException.InvalidArgument("speculative draftVocab must be at least 1, not $draftVocab")
    }
    return SpeculativeOptions(
        draft = draft,
        cache = cache,
        k = k.toUInt(),
        maxK = maxK.toUInt(),
        adaptive = adaptive,
        draftVocab = draftVocab?.toUInt(),
    )
}

/**
 * [speculative] with the draft given by name: a level (`"s"`), a catalog entry, or per-layer
 * level names or indices (`"s,s,m,l"`, `"0,0,1,3"`).
 */
fun speculative(
    draft: String,
    cache: DraftCache = DraftCache.SHARED,
    k: Int = 4,
    maxK: Int = maxOf(8, k),
    adaptive: Boolean = true,
    draftVocab: Int? = null,
): SpeculativeOptions = speculative(DraftChoice.Named(draft), cache, k, maxK, adaptive, draftVocab)

/** A draft of one level index per layer (`draftLevels(0, 0, 1, 2)`). */
fun draftLevels(vararg levels: Int): DraftChoice {
    levels.firstOrNull { it < 0 }?.let { throw MatformerException.InvalidArgument("level $it is out of range") }
    return DraftChoice.Levels(levels.map { it.toUInt() })
}

/** These options with speculative decoding on ([speculative]'s defaults: the smallest submodel drafts). */
fun GenerateOptions.withSpeculative(options: SpeculativeOptions = dev.matformer.speculative()): GenerateOptions =
    copy(speculative = options)
