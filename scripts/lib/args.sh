# Sourced by the scripts in scripts/: what they share to read their command
# line. Each script documents itself in a header from "# Usage:" to "# Needs".

# The script's usage: its header block.
usage() {
    sed -n '/^# Usage:/,/^# Needs/p' "$0" | sed 's/^# \{0,1\}//'
}

# The `:` and `?` branches of `getopts ":..."`: say what is wrong, exit 2.
bad_option() {
    if [ "$1" = ":" ]; then
        echo "error: -$OPTARG needs a value" >&2
    else
        echo "error: unknown option -$OPTARG" >&2
    fi
    usage >&2
    exit 2
}

# After the options (`shift $((OPTIND - 1))`): no argument is left.
no_arguments() {
    if [ "$#" -gt 0 ]; then
        echo "error: unexpected argument: $1" >&2
        usage >&2
        exit 2
    fi
}

# need_number FLAG VALUE [MIN]: VALUE is a whole number (at least MIN).
need_number() {
    local flag=$1 value=$2 min=${3:-}
    if [ -z "$min" ]; then
        [[ $value =~ ^(0|[1-9][0-9]*)$ ]] || { echo "error: $flag wants a number, got '$value'" >&2; exit 2; }
    else
        { [[ $value =~ ^(0|[1-9][0-9]*)$ ]] && [ "$value" -ge "$min" ]; } \
            || { echo "error: $flag wants a number >= $min, got '$value'" >&2; exit 2; }
    fi
}

# need_tools TOOL...: each is on PATH, or exit 1 naming it.
need_tools() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is not on PATH" >&2; exit 1; }
    done
}
