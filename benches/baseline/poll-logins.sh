# Sourced by the bench baselines (tutorial-lab.sh, virt-lightning.sh): poll a real SSH
# login on every node the way the tutorials do, once a second, all nodes at once.
#
#   poll_logins KEY USER NET N PREFIX START TIMEOUT HINT
#
# Node i is PREFIX$i at NET.(11+i). START is the $SECONDS value the timing counts from;
# each node prints "PREFIXi ssh SECONDS" once it accepts a login. A node still refusing
# after TIMEOUT seconds fails the call, and HINT (with {node} replaced by the node's
# name) says where to look. Returns non-zero if any node failed.
poll_logins() {
    local key=$1 user=$2 net=$3 n=$4 prefix=$5 start=$6 timeout=$7 hint=$8
    local pids=() i failed=0
    for ((i = 0; i < n; i++)); do
        (
            until ssh -q -i "$key" -o BatchMode=yes -o StrictHostKeyChecking=no \
                -o UserKnownHostsFile=/dev/null -o ConnectTimeout=2 "$user@$net.$((11 + i))" true 2>/dev/null; do
                if ((SECONDS - start > timeout)); then
                    echo "$prefix$i: no login after $timeout s${hint:+; ${hint//\{node\}/$prefix$i}}" >&2
                    exit 1
                fi
                sleep 1
            done
            echo "$prefix$i ssh $((SECONDS - start))"
        ) &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || failed=1; done
    return $failed
}
