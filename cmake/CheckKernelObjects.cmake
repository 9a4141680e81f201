# ctest script: NOTE [ Linking AVX and non-AVX files ] (csrc/cpu/dispatch.cpp), checked on the
# objects. Every weak symbol (an inline function or template the compiler emitted out of line) that a
# capability's kernel object defines outside that capability's own namespaces must also be defined
# by the DEFAULT kernel object, which is linked before it: then the linker keeps a copy compiled
# without AVX instructions.
#
#   cmake -DNM=<nm> -DDEFAULT_OBJECT=<obj> -DOBJECTS=<cap>=<obj>;... -P CheckKernelObjects.cmake
function(weak_symbols object out)
  execute_process(COMMAND "${NM}" --defined-only "${object}" OUTPUT_VARIABLE _listing RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "${NM} failed on ${object}")
  endif()
  string(REGEX MATCHALL "[^\n]+" _lines "${_listing}")
  set(_symbols "")
  foreach(_line IN LISTS _lines)
    if(_line MATCHES "^[0-9a-fA-F]* *[WVuw] (.+)$")
      list(APPEND _symbols "${CMAKE_MATCH_1}")
    endif()
  endforeach()
  set(${out} "${_symbols}" PARENT_SCOPE)
endfunction()

weak_symbols("${DEFAULT_OBJECT}" default_symbols)
set(problems 0)
foreach(entry IN LISTS OBJECTS)
  string(REPLACE "=" ";" entry "${entry}")
  list(GET entry 0 capability)
  list(GET entry 1 object)
  string(LENGTH "${capability}" length)
  weak_symbols("${object}" symbols)
  set(checked 0)
  foreach(symbol IN LISTS symbols)
    # Mangled names of the capability's namespaces (pyfastnn::cpu::AVX2, at::vec::AVX2) hold "4AVX2".
    string(FIND "${symbol}" "${length}${capability}" own)
    if(own EQUAL -1)
      math(EXPR checked "${checked} + 1")
      list(FIND default_symbols "${symbol}" found)
      if(found EQUAL -1)
        message(SEND_ERROR "${symbol} is emitted by the ${capability} kernel object but not by the DEFAULT one "
                           "linked before it: the linker could keep its ${capability} copy")
        math(EXPR problems "${problems} + 1")
      endif()
    endif()
  endforeach()
  message(STATUS "${capability}: ${checked} shared weak symbols, each also in the DEFAULT kernel object")
endforeach()
if(problems GREATER 0)
  message(FATAL_ERROR "${problems} symbols could resolve to an AVX copy")
endif()
