#include "pmlmig/base/watchdog.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>

namespace pmlmig {
namespace {

using namespace std::chrono_literals;

TEST(Watchdog, FiresOnceAtTheDeadline) {
  std::atomic<int> fired{0};
  Watchdog w(std::chrono::steady_clock::now() + 20ms, [&] { ++fired; });
  for (int i = 0; i < 500 && fired.load() == 0; ++i) std::this_thread::sleep_for(10ms);
  w.Disarm();
  EXPECT_EQ(fired.load(), 1);
  EXPECT_TRUE(w.fired());
}

TEST(Watchdog, DisarmedBeforeTheDeadlineNeverFires) {
  std::atomic<int> fired{0};
  {
    Watchdog w(std::chrono::steady_clock::now() + 1h, [&] { ++fired; });
    w.Disarm();
    EXPECT_FALSE(w.fired());
  }
  EXPECT_EQ(fired.load(), 0);
}

TEST(Watchdog, ChecksEveryTickUntilTheCheckActs) {
  std::atomic<int> calls{0};
  Watchdog w(1ms, [&] { return ++calls == 5; });
  for (int i = 0; i < 500 && !w.fired(); ++i) std::this_thread::sleep_for(10ms);
  std::this_thread::sleep_for(20ms);  // no call after the one that acted
  EXPECT_TRUE(w.fired());
  EXPECT_EQ(calls.load(), 5);
}

}  // namespace
}  // namespace pmlmig
