// How an actor's failure is told: an actor that throws exits with the exception's text as its
// reason (CAF's default handler keeps only "runtime_error"), so whoever monitors it (a
// supervisor counting restarts, `celer serve` reporting why a start failed) can say what
// happened: "std::bad_alloc", "cannot open the stage log ...".
#pragma once

#include <exception>
#include <string>

#include <caf/all.hpp>

namespace celer {

template <class Self>
void exit_with_exception_text(Self* self) {
  self->set_exception_handler([](caf::scheduled_actor*, std::exception_ptr& eptr) -> caf::error {
    try {
      std::rethrow_exception(eptr);
    } catch (const std::exception& e) {
      return caf::make_error(caf::sec::runtime_error, std::string(e.what()));
    } catch (...) {
      return caf::make_error(caf::sec::runtime_error, std::string("an unknown exception"));
    }
  });
}

// The text of an exit reason: the string it carries, else CAF's rendering of it.
inline std::string failure_text(caf::actor_system& sys, const caf::error& reason) {
  const caf::message& context = reason.context();
  if (context.match_elements<std::string>()) return context.get_as<std::string>(0);
  return sys.render(reason);
}

}  // namespace celer
