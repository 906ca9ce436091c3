/* DeepSeek-V3 expert selection (sigmoid scores, group-limited top-k) for a batch of router logits, included
 * by decode_gemm.c. Plain C: E is small (16-256), so this is a few hundred comparisons per token, where
 * the same selection in torch is about 20 small ops per MoE layer (the cost that matters at decode).
 *
 * For each token n, with s = sigmoid(logits[n]) and b = s + bias:
 *   group score g = sum of the 2 largest b in the group (one group: no group limit);
 *   keep the topk_group groups with the largest scores (ties: the lower group);
 *   ids[n] = the k experts with the largest b among the kept groups, largest first (ties: the lower id);
 *   weights[n] = s[ids] (divided by their sum + 1e-20 if norm), times scale.
 * The definition is engram_kernels/cpu_decode/moe_router.py:sigmoid_route_ref, which is the model's Router in torch.
 */
#include <math.h>

#define ROUTE_MAX_EXPERTS 1024

void engram_sigmoid_route(const float *logits, int64_t ld, int64_t N, int64_t E, const float *bias, int64_t groups,
                          int64_t topk_group, int64_t k, int norm, float scale, int64_t *ids, float *weights) {
    float s[ROUTE_MAX_EXPERTS], b[ROUTE_MAX_EXPERTS];
    unsigned char kept[ROUTE_MAX_EXPERTS];
    int64_t per_group = E / groups;
    for (int64_t n = 0; n < N; n++) {
        const float *row = logits + n * ld;
        for (int64_t e = 0; e < E; e++) {
            s[e] = 1.0f / (1.0f + expf(-row[e]));
            b[e] = s[e] + (bias ? bias[e] : 0.0f);
            kept[e] = groups == 1;
        }
        if (groups > 1) {
            float score[ROUTE_MAX_EXPERTS];
            unsigned char taken[ROUTE_MAX_EXPERTS] = {0};
            for (int64_t g = 0; g < groups; g++) { /* sum of the group's two largest biased scores */
                float first = -INFINITY, second = -INFINITY;
                for (int64_t e = g * per_group; e < (g + 1) * per_group; e++) {
                    if (b[e] > first) { second = first; first = b[e]; }
                    else if (b[e] > second) second = b[e];
                }
                score[g] = per_group > 1 ? first + second : first;
            }
            for (int64_t t = 0; t < topk_group; t++) {
                int64_t best = -1;
                for (int64_t g = 0; g < groups; g++)
                    if (!taken[g] && (best < 0 || score[g] > score[best])) best = g;
                taken[best] = 1;
                for (int64_t e = best * per_group; e < (best + 1) * per_group; e++) kept[e] = 1;
            }
        }
        float total = 0.0f;
        for (int64_t j = 0; j < k; j++) { /* the k largest kept b, largest first */
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++)
                if (kept[e] && (best < 0 || b[e] > b[best])) best = e;
            kept[best] = 0;
            ids[n * k + j] = best;
            weights[n * k + j] = s[best];
            total += s[best];
        }
        for (int64_t j = 0; j < k; j++) /* as the reference: (s / (sum + 1e-20)) * scale */
            weights[n * k + j] = (norm ? weights[n * k + j] / (total + 1e-20f) : weights[n * k + j]) * scale;
    }
}
