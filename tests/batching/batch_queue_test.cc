// BatchQueue's decisions with time passed in: nothing here sleeps.
#include "server/batching/batch_queue.h"

#include "tests/test_util.h"

namespace moe {
namespace {

using ::moe::testing::StatusIs;
using ::testing::HasSubstr;

const absl::Time kStart = absl::FromUnixSeconds(1000);

std::unique_ptr<PendingRequest> Request(int tokens, absl::Time enqueued, std::optional<int> layer = std::nullopt) {
  auto request = std::make_unique<PendingRequest>();
  request->num_tokens = tokens;
  request->enqueue_time = enqueued;
  request->layer = layer;
  return request;
}

std::unique_ptr<BatchQueue> Queue(int64_t max_tokens, absl::Duration delay, int max_size = 100) {
  auto queue =
      BatchQueue::Create({.max_batch_tokens = max_tokens, .max_queue_delay = delay, .max_queue_size = max_size});
  EXPECT_OK(queue);
  return std::move(*queue);
}

int Tokens(const std::vector<std::unique_ptr<PendingRequest>>& batch) {
  int total = 0;
  for (const auto& r : batch) total += r->num_tokens;
  return total;
}

TEST(BatchQueue, HoldsAnUnderfullBatchUntilTheQueueDelayElapses) {
  auto queue = Queue(64, absl::Milliseconds(2));
  auto a = Request(4, kStart);
  ASSERT_OK(queue->Add(a));
  EXPECT_TRUE(queue->TakeBatch(kStart + absl::Milliseconds(1), false).empty());
  EXPECT_EQ(queue->NextWakeTime(), kStart + absl::Milliseconds(2));
}

TEST(BatchQueue, ClosesPartialBatchWhenQueueDelayElapses) {
  auto queue = Queue(64, absl::Milliseconds(2));
  for (int i = 0; i < 3; ++i) {
    auto r = Request(4, kStart + absl::Microseconds(100 * i));
    ASSERT_OK(queue->Add(r));
  }
  auto batch = queue->TakeBatch(kStart + absl::Milliseconds(2), false);
  EXPECT_EQ(batch.size(), 3u);
  EXPECT_TRUE(queue->empty());
}

TEST(BatchQueue, ClosesAFullBatchAtOnceAndLeavesTheRestQueued) {
  auto queue = Queue(10, absl::Seconds(10));
  for (int tokens : {4, 4, 4, 1}) {
    auto r = Request(tokens, kStart);
    ASSERT_OK(queue->Add(r));
  }
  auto batch = queue->TakeBatch(kStart, false);
  EXPECT_EQ(Tokens(batch), 8);  // the third request would exceed 10 tokens
  EXPECT_EQ(queue->size(), 2u);
  EXPECT_TRUE(queue->TakeBatch(kStart, false).empty());  // 5 tokens: not full, not waited
}

TEST(BatchQueue, ExactlyFullBatchIsReadyImmediately) {
  auto queue = Queue(8, absl::Seconds(10));
  for (int i = 0; i < 2; ++i) {
    auto r = Request(4, kStart);
    ASSERT_OK(queue->Add(r));
  }
  EXPECT_EQ(Tokens(queue->TakeBatch(kStart, false)), 8);
}

TEST(BatchQueue, NeverMixesLayersInOneBatch) {
  auto queue = Queue(100, absl::ZeroDuration());
  for (std::optional<int> layer :
       {std::optional<int>(), std::optional<int>(1), std::optional<int>(), std::optional<int>(1)}) {
    auto r = Request(1, kStart, layer);
    ASSERT_OK(queue->Add(r));
  }
  auto first = queue->TakeBatch(kStart, false);
  ASSERT_EQ(first.size(), 2u);
  EXPECT_FALSE(first[0]->layer.has_value());
  EXPECT_FALSE(first[1]->layer.has_value());
  auto second = queue->TakeBatch(kStart, false);
  ASSERT_EQ(second.size(), 2u);
  EXPECT_EQ(second[0]->layer, 1);
}

TEST(BatchQueue, RejectsWhenFullWithUnavailableAndKeepsTheRequest) {
  auto queue = Queue(100, absl::Seconds(1), /*max_size=*/2);
  for (int i = 0; i < 2; ++i) {
    auto r = Request(1, kStart);
    ASSERT_OK(queue->Add(r));
  }
  auto third = Request(1, kStart);
  EXPECT_THAT(queue->Add(third), StatusIs(absl::StatusCode::kUnavailable, HasSubstr("queue full")));
  EXPECT_NE(third, nullptr);  // still the caller's to answer
  EXPECT_EQ(queue->size(), 2u);
}

TEST(BatchQueue, ExpiredAndCancelledRequestsLeaveWithoutBatching) {
  auto queue = Queue(100, absl::Seconds(1));
  auto expired = Request(1, kStart);
  expired->deadline = kStart + absl::Milliseconds(5);
  auto cancelled = Request(1, kStart);
  cancelled->is_cancelled = [] { return true; };
  auto alive = Request(1, kStart);
  ASSERT_OK(queue->Add(expired));
  ASSERT_OK(queue->Add(cancelled));
  ASSERT_OK(queue->Add(alive));
  EXPECT_EQ(queue->NextWakeTime(), kStart + absl::Milliseconds(5));
  auto gone = queue->TakeExpired(kStart + absl::Milliseconds(5));
  EXPECT_EQ(gone.size(), 2u);
  EXPECT_EQ(queue->size(), 1u);
}

TEST(BatchQueue, FlushTakesWhateverIsQueued) {
  auto queue = Queue(100, absl::Hours(1));
  auto r = Request(3, kStart);
  ASSERT_OK(queue->Add(r));
  EXPECT_EQ(Tokens(queue->TakeBatch(kStart, /*flush=*/true)), 3);
}

TEST(BatchQueue, CreateValidatesOptions) {
  EXPECT_THAT(BatchQueue::Create({.max_batch_tokens = 0}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_batch_tokens")));
  EXPECT_THAT(BatchQueue::Create({.max_queue_size = 0}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_queue_size")));
  EXPECT_THAT(BatchQueue::Create({.max_queue_delay = absl::Seconds(-1)}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("negative")));
}

}  // namespace
}  // namespace moe
